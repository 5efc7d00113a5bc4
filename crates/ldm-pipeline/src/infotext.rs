//! Generation parameters as AUTOMATIC1111 writes them into a PNG's `parameters` text chunk
//! (`modules/processing.py: create_infotext`): the prompt, a `Negative prompt:` line when there is one, and a
//! line of `Key: value` pairs joined by ", ", where a value holding a comma, colon or newline is JSON-quoted.

/// One `Key: value` pair of the last line.
pub type Field = (&'static str, String);

/// Builds the text. `fields` are written in order.
pub fn infotext(prompt: &str, negative_prompt: &str, fields: &[Field]) -> String {
    let mut out = String::from(prompt);
    if !negative_prompt.is_empty() {
        out.push_str("\nNegative prompt: ");
        out.push_str(negative_prompt);
    }
    let line: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{k}: {}", quote(v)))
        .collect();
    out.push('\n');
    out.push_str(&line.join(", "));
    out
}

fn quote(v: &str) -> String {
    if v.contains([',', ':', '\n']) {
        serde_json::to_string(v).unwrap_or_else(|_| v.to_string())
    } else {
        v.to_string()
    }
}

/// A number as Python's `str(float)` would print the values A1111 writes (7.0 → "7.0", 7.5 → "7.5").
pub fn py_float(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a1111_layout() {
        let t = infotext(
            "a cat, highly detailed",
            "blurry",
            &[
                ("Steps", "20".into()),
                ("Sampler", "DPM++ 2M Karras".into()),
                ("CFG scale", py_float(7.0)),
                ("Seed", "42".into()),
                ("Size", "512x512".into()),
                ("Model", "sd: v1".into()),
            ],
        );
        assert_eq!(
            t,
            "a cat, highly detailed\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.0, \
             Seed: 42, Size: 512x512, Model: \"sd: v1\""
        );
        assert_eq!(infotext("x", "", &[("Steps", "1".into())]), "x\nSteps: 1");
        assert_eq!(py_float(7.5), "7.5");
    }
}
