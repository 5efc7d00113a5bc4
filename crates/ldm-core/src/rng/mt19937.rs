//! The 32-bit Mersenne Twister MT19937 (Matsumoto & Nishimura 1998), seeded the way PyTorch's
//! `at::mt19937` (aten/src/ATen/core/MT19937RNGEngine.h) seeds it: only the low 32 bits of the 64-bit seed
//! enter the state (`init_genrand`), so seeds `s` and `s + 2^32` give the same stream.

/// Number of 32-bit words of state.
const N: usize = 624;
/// Middle word offset of the recurrence.
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// The serializable state of an [`Mt19937`]: the 624 state words, the index of the next word to use (624 means
/// "twist first") and the seed it was created with.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mt19937State {
    pub seed: u64,
    pub words: Vec<u32>,
    pub next: usize,
}

/// A saved generator state that cannot be restored (wrong length, index out of range).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid random generator state: {0}")]
pub struct InvalidRngState(pub String);

/// MT19937 with PyTorch's seeding and output order (identical to `std::mt19937` for seeds below 2^32).
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; N],
    /// Index of the next word of `state` to temper and return; `N` means "regenerate first".
    next: usize,
    seed: u64,
}

impl std::fmt::Debug for Mt19937 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mt19937")
            .field("seed", &self.seed)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl Mt19937 {
    /// A generator in the state `at::mt19937(seed)` starts in.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = seed as u32; // low 32 bits, as PyTorch's `seed & 0xffffffff`
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self {
            state,
            next: N,
            seed,
        }
    }

    /// The seed this generator was created with (all 64 bits, as `torch.initial_seed()` reports it).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The next 32 random bits (PyTorch's `CPUGeneratorImpl::random`).
    pub fn next_u32(&mut self) -> u32 {
        if self.next >= N {
            self.regenerate();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// 64 random bits from two draws, the first in the high half (PyTorch's `CPUGeneratorImpl::random64`).
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32();
        let lo = self.next_u32();
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// The complete state, for checkpoints: restoring it with [`Mt19937::from_state`] continues the stream
    /// exactly where it stands now.
    pub fn state(&self) -> Mt19937State {
        Mt19937State {
            seed: self.seed,
            words: self.state.to_vec(),
            next: self.next,
        }
    }

    /// A generator in the given state. Fails if the state has the wrong number of words or an index past them.
    pub fn from_state(state: &Mt19937State) -> Result<Self, InvalidRngState> {
        let words: [u32; N] = state.words.as_slice().try_into().map_err(|_| {
            InvalidRngState(format!(
                "MT19937 state has {} words, expected {N}",
                state.words.len()
            ))
        })?;
        if state.next > N {
            return Err(InvalidRngState(format!(
                "MT19937 index {} is past the {N} state words",
                state.next
            )));
        }
        if words.iter().all(|&w| w == 0) {
            return Err(InvalidRngState("MT19937 state is all zeros".into()));
        }
        Ok(Self {
            state: words,
            next: state.next,
            seed: state.seed,
        })
    }

    /// The twist: replaces all N words in place, in index order.
    fn regenerate(&mut self) {
        let s = &mut self.state;
        for i in 0..N {
            let v = s[(i + 1) % N];
            let mixed = (s[i] & UPPER_MASK) | (v & LOWER_MASK);
            let twisted = (mixed >> 1) ^ if v & 1 == 1 { MATRIX_A } else { 0 };
            s[i] = s[(i + M) % N] ^ twisted;
        }
        self.next = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_reference_mt19937_outputs() {
        // The C++ standard fixes the 10000th output of std::mt19937 seeded with its default seed 5489.
        let mut g = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = g.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
        // First outputs of mt19937ar's init_genrand(5489) / numpy.random.RandomState(5489)... are well known too.
        let mut g = Mt19937::new(5489);
        assert_eq!(g.next_u32(), 3_499_211_612);
        assert_eq!(g.next_u32(), 581_869_302);
    }

    #[test]
    fn only_low_32_bits_of_the_seed_matter() {
        let mut a = Mt19937::new(5);
        let mut b = Mt19937::new((1u64 << 32) + 5);
        for _ in 0..1000 {
            assert_eq!(a.next_u32(), b.next_u32());
        }
        assert_eq!(b.seed(), (1u64 << 32) + 5);
    }

    #[test]
    fn state_round_trip_continues_the_stream() {
        for skip in [0usize, 1, 623, 624, 625, 5000] {
            let mut a = Mt19937::new(77);
            for _ in 0..skip {
                a.next_u32();
            }
            let saved = a.state();
            let ahead: Vec<u32> = (0..1300).map(|_| a.next_u32()).collect();
            let mut b = Mt19937::from_state(&saved).expect("valid state");
            let again: Vec<u32> = (0..1300).map(|_| b.next_u32()).collect();
            assert_eq!(ahead, again, "skip {skip}");
            assert_eq!(b.seed(), 77);
        }
        let mut bad = Mt19937::new(1).state();
        bad.next = 625;
        assert!(Mt19937::from_state(&bad).is_err());
        bad.next = 0;
        bad.words.pop();
        assert!(Mt19937::from_state(&bad).is_err());
    }

    #[test]
    fn next_u64_puts_first_draw_high() {
        let mut a = Mt19937::new(9);
        let mut b = Mt19937::new(9);
        let hi = a.next_u32();
        let lo = a.next_u32();
        assert_eq!(b.next_u64(), (u64::from(hi) << 32) | u64::from(lo));
    }
}
