//! `--lora FILE[:WEIGHT]` (repeatable) of the generating commands: kohya LoRAs merged at load.
use ldm_pipeline::Opened;

/// Merges every `--lora` value into `opened`'s weights and says what was merged.
pub fn apply(opened: &mut Opened, args: &[String]) -> anyhow::Result<()> {
    if args.is_empty() {
        return Ok(());
    }
    let loras: Vec<_> = args
        .iter()
        .map(|a| ldm_pipeline::lora::parse_lora_arg(a))
        .collect();
    let report = ldm_pipeline::lora::apply_loras(opened, &loras)?;
    eprintln!(
        "LoRA: {} modules merged into {} weights",
        report.modules_matched(),
        report.keys.len()
    );
    Ok(())
}
