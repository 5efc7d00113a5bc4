//! Batches from a [`Dataset`]: epoch-wise shuffled, reproducible from a seed, resumable from a position.
//!
//! * Order of epoch `e`: [`randperm`]`(n, TorchRng::new(seed + e))`, which equals
//!   `torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))` — the order PyTorch's
//!   `DistributedSampler(shuffle=True, seed=seed)` gives after `set_epoch(e)` on one process.
//! * Random transforms of the example at position `k` of epoch `e`: a generator seeded from a hash of
//!   `(seed, e, k)`, so they depend on nothing else (not the batch size, not what was drawn before).
//!
//! So the whole state is a [`LoaderPosition`] `(epoch, index)`: a run resumed from a saved position sees
//! exactly the batches the uninterrupted run would have seen.
use candle_core::{Device, Tensor};
use ldm_core::rng::TorchRng;
use serde::{Deserialize, Serialize};

use super::Dataset;
use crate::error::{Result, TrainError};

/// How batches are drawn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Shuffle every epoch (otherwise examples come in index order).
    pub shuffle: bool,
    /// Leave out the last batch of an epoch if it would be smaller than `batch_size`.
    pub drop_last: bool,
    pub seed: u64,
}

/// Where a [`Loader`] is: the next batch starts at position `index` of epoch `epoch`'s order. `seed` and
/// `dataset_len` are kept to refuse resuming on other data or with another seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderPosition {
    pub epoch: u64,
    pub index: usize,
    pub seed: u64,
    pub dataset_len: usize,
}

/// One batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, C, H, W]` f32: images in [−1, 1] (or latents, from a latent cache).
    pub images: Tensor,
    pub captions: Vec<Option<String>>,
    pub labels: Vec<Option<usize>>,
    /// The data set indices of the examples.
    pub indices: Vec<usize>,
    /// The epoch the batch belongs to.
    pub epoch: u64,
}

impl Batch {
    /// The labels as `u32`s when every example has one.
    pub fn labels_u32(&self) -> Option<Vec<u32>> {
        self.labels.iter().map(|l| l.map(|l| l as u32)).collect()
    }
}

/// Draws batches without end, epoch after epoch. It holds no data set: each call is handed one, which must
/// have the length the loader was made for.
#[derive(Debug, Clone)]
pub struct Loader {
    config: LoaderConfig,
    position: LoaderPosition,
    /// The order of `position.epoch`.
    order: Vec<usize>,
}

impl Loader {
    /// A loader at the start of epoch 0 for a data set of `dataset_len` examples.
    pub fn new(config: LoaderConfig, dataset_len: usize) -> Result<Self> {
        let position = LoaderPosition {
            epoch: 0,
            index: 0,
            seed: config.seed,
            dataset_len,
        };
        Self::resume(config, position)
    }

    /// A loader at a saved position.
    pub fn resume(config: LoaderConfig, position: LoaderPosition) -> Result<Self> {
        let n = position.dataset_len;
        if config.batch_size == 0 {
            return Err(TrainError::invalid("batch_size", "must be at least 1"));
        }
        if n == 0 {
            return Err(TrainError::invalid("dataset", "no examples to draw from"));
        }
        if config.drop_last && config.batch_size > n {
            return Err(TrainError::invalid(
                "batch_size",
                format!(
                    "{} with drop_last, but the data set has only {n} examples",
                    config.batch_size
                ),
            ));
        }
        if position.seed != config.seed {
            return Err(TrainError::invalid(
                "seed",
                format!(
                    "the saved data position was made with seed {}, not {}",
                    position.seed, config.seed
                ),
            ));
        }
        if position.index > n {
            return Err(TrainError::invalid(
                "position",
                format!("index {} in an epoch of {n} examples", position.index),
            ));
        }
        let mut loader = Self {
            order: Vec::new(),
            config,
            position,
        };
        loader.order = loader.epoch_order(position.epoch);
        loader.roll_over();
        Ok(loader)
    }

    /// The position of the next batch (save it with a checkpoint; give it to [`resume`](Self::resume)).
    pub fn position(&self) -> LoaderPosition {
        self.position
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// Batches in one epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.position.dataset_len, self.config.batch_size);
        if self.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The order in which epoch `epoch` visits the data set.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let n = self.position.dataset_len;
        if self.config.shuffle {
            randperm(n, &mut TorchRng::new(self.config.seed.wrapping_add(epoch)))
        } else {
            (0..n).collect()
        }
    }

    /// The next batch, on `device`. `dataset` must have the length the loader was made for.
    pub fn next_batch<D: Dataset + ?Sized>(
        &mut self,
        dataset: &D,
        device: &Device,
    ) -> Result<Batch> {
        if dataset.len() != self.position.dataset_len {
            return Err(TrainError::invalid(
                "dataset",
                format!(
                    "the loader was made for {} examples, this data set has {}",
                    self.position.dataset_len,
                    dataset.len()
                ),
            ));
        }
        let LoaderPosition { epoch, index, .. } = self.position;
        let end = (index + self.config.batch_size).min(self.order.len());
        let mut images = Vec::with_capacity(end - index);
        let mut captions = Vec::with_capacity(end - index);
        let mut labels = Vec::with_capacity(end - index);
        let mut indices = Vec::with_capacity(end - index);
        for k in index..end {
            let i = self.order[k];
            let mut rng = TorchRng::new(example_seed(self.config.seed, epoch, k));
            let s = dataset.get(i, &mut rng)?;
            images.push(s.image);
            captions.push(s.caption);
            labels.push(s.label);
            indices.push(i);
        }
        let images = Tensor::stack(&images, 0)?.to_device(device)?;
        self.position.index = end;
        self.roll_over();
        Ok(Batch {
            images,
            captions,
            labels,
            indices,
            epoch,
        })
    }

    /// Moves to the next epoch when the current one has no (full, with `drop_last`) batch left.
    fn roll_over(&mut self) {
        let left = self.position.dataset_len - self.position.index;
        if left == 0 || (self.config.drop_last && left < self.config.batch_size) {
            self.position.epoch += 1;
            self.position.index = 0;
            self.order = self.epoch_order(self.position.epoch);
        }
    }
}

/// A random permutation of `0..n`, exactly as `torch.randperm(n, generator=g)` on the CPU (torch 2.x
/// `randperm_cpu`): for i in 0..n−1, swap element i with element i + (random() mod (n − i)), using
/// `random64()` instead for n ≥ (2³² − 1)/20.
pub fn randperm(n: usize, rng: &mut TorchRng) -> Vec<usize> {
    let mut r: Vec<usize> = (0..n).collect();
    let small = (n as u64) < u64::from(u32::MAX) / 20;
    for i in 0..n.saturating_sub(1) {
        let m = (n - i) as u64;
        let z = if small {
            u64::from(rng.random_u32()) % m
        } else {
            rng.random_u64() % m
        };
        r.swap(i, i + z as usize);
    }
    r
}

/// SplitMix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of the transform generator of position `k` in epoch `epoch`.
fn example_seed(seed: u64, epoch: u64, k: usize) -> u64 {
    // The tag keeps these seeds apart from the order seeds `seed + epoch`.
    mix(mix(mix(seed ^ 0x6461_7461_2d61_7567) ^ epoch) ^ k as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `torch.randperm(n, generator=torch.Generator().manual_seed(s)).tolist()` with torch 2.15.
    #[test]
    fn randperm_matches_torch() {
        assert_eq!(
            randperm(10, &mut TorchRng::new(7)),
            [5, 0, 3, 4, 1, 7, 9, 6, 8, 2]
        );
        assert_eq!(
            randperm(20, &mut TorchRng::new(3)),
            [6, 12, 3, 7, 1, 5, 8, 9, 2, 17, 14, 11, 13, 19, 10, 4, 15, 0, 18, 16]
        );
        assert_eq!(
            randperm(1000, &mut TorchRng::new(3))[..10],
            [986, 114, 871, 894, 140, 885, 232, 402, 837, 674]
        );
    }
}
