//! Typed, key-tracking reads from one `params:` map of an original YAML. Every read names its section and key in
//! the error; keys that no read touched are reported afterwards (ignored silently when listed as harmless,
//! otherwise returned to the caller to log), so a misspelt or new architecture key never vanishes unnoticed.
use std::cell::RefCell;

use yaml_rust2::yaml::Hash;
use yaml_rust2::Yaml;

use super::Problem;

pub(crate) type Parsed<T> = std::result::Result<T, Problem>;

/// A short description of a YAML value for error messages (`an integer 3`, `a list`, `the string "x"`).
pub(crate) fn describe(y: &Yaml) -> String {
    match y {
        Yaml::Real(s) => format!("the number {s}"),
        Yaml::Integer(i) => format!("the integer {i}"),
        Yaml::String(s) => {
            let short: String = s.chars().take(60).collect();
            format!("the string {short:?}")
        }
        Yaml::Boolean(b) => format!("the boolean {b}"),
        Yaml::Array(a) => format!("a list of {}", a.len()),
        Yaml::Hash(_) => "a map".into(),
        Yaml::Alias(_) => "an alias".into(),
        Yaml::Null => "null".into(),
        Yaml::BadValue => "nothing".into(),
    }
}

/// A boolean as PyYAML (YAML 1.1) reads it: `true`/`True`/`TRUE`, and also `yes`/`no`/`on`/`off`.
fn as_bool(y: &Yaml) -> Option<bool> {
    match y {
        Yaml::Boolean(b) => Some(*b),
        Yaml::String(s) => match s.as_str() {
            "yes" | "Yes" | "YES" | "on" | "On" | "ON" => Some(true),
            "no" | "No" | "NO" | "off" | "Off" | "OFF" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn as_f64(y: &Yaml) -> Option<f64> {
    match y {
        Yaml::Real(_) => y.as_f64().filter(|v| v.is_finite()),
        Yaml::Integer(i) => Some(*i as f64),
        _ => None,
    }
}

fn as_usize(y: &Yaml) -> Option<usize> {
    match y {
        Yaml::Integer(i) => usize::try_from(*i).ok(),
        _ => None,
    }
}

/// One `params:` map (or a missing one, which reads as empty) and the keys read from it.
pub(crate) struct Params<'a> {
    section: String,
    map: Option<&'a Hash>,
    used: RefCell<Vec<&'static str>>,
}

impl<'a> Params<'a> {
    /// `y` is the map itself; absent (`BadValue`) or `null` means no parameters.
    pub fn new(section: impl Into<String>, y: &'a Yaml) -> Parsed<Self> {
        let section = section.into();
        let map = match y {
            Yaml::Hash(h) => Some(h),
            Yaml::BadValue | Yaml::Null => None,
            other => {
                return Err(Problem::Type {
                    section: parent_of(&section),
                    key: last_of(&section),
                    expected: "a map",
                    found: describe(other),
                })
            }
        };
        Ok(Self {
            section,
            map,
            used: RefCell::new(Vec::new()),
        })
    }

    pub fn section(&self) -> &str {
        &self.section
    }

    /// The raw value; `null` counts as absent (the original's `None` means "use the default" for every key read
    /// here).
    pub fn get(&self, key: &'static str) -> Option<&'a Yaml> {
        self.used.borrow_mut().push(key);
        let map = self.map?;
        map.get(&Yaml::String(key.to_string()))
            .filter(|v| !matches!(v, Yaml::Null))
    }

    pub fn missing(&self, key: &str) -> Problem {
        Problem::Missing {
            section: self.section.clone(),
            key: key.to_string(),
        }
    }

    pub fn wrong(&self, key: &str, expected: &'static str, found: &Yaml) -> Problem {
        Problem::Type {
            section: self.section.clone(),
            key: key.to_string(),
            expected,
            found: describe(found),
        }
    }

    pub fn invalid(
        &self,
        key: &str,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Problem {
        Problem::Value {
            section: self.section.clone(),
            key: key.to_string(),
            value: value.into(),
            reason: reason.into(),
        }
    }

    fn typed<T>(
        &self,
        key: &'static str,
        expected: &'static str,
        conv: impl Fn(&Yaml) -> Option<T>,
    ) -> Parsed<Option<T>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => conv(v)
                .map(Some)
                .ok_or_else(|| self.wrong(key, expected, v)),
        }
    }

    pub fn opt_usize(&self, key: &'static str) -> Parsed<Option<usize>> {
        self.typed(key, "a non-negative integer", as_usize)
    }
    pub fn req_usize(&self, key: &'static str) -> Parsed<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }
    pub fn usize_or(&self, key: &'static str, default: usize) -> Parsed<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }
    /// An integer where the original uses `-1` for "not given" (`num_heads`, `num_head_channels`).
    pub fn opt_usize_or_minus_one(&self, key: &'static str) -> Parsed<Option<usize>> {
        match self.get(key) {
            Some(Yaml::Integer(-1)) => Ok(None),
            _ => self.opt_usize(key),
        }
    }

    pub fn opt_f64(&self, key: &'static str) -> Parsed<Option<f64>> {
        self.typed(key, "a finite number", as_f64)
    }
    pub fn f64_or(&self, key: &'static str, default: f64) -> Parsed<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    pub fn bool_or(&self, key: &'static str, default: bool) -> Parsed<bool> {
        Ok(self.typed(key, "a boolean", as_bool)?.unwrap_or(default))
    }

    pub fn opt_str(&self, key: &'static str) -> Parsed<Option<String>> {
        self.typed(key, "a string", |y| y.as_str().map(str::to_string))
    }
    pub fn str_or(&self, key: &'static str, default: &str) -> Parsed<String> {
        Ok(self.opt_str(key)?.unwrap_or_else(|| default.to_string()))
    }

    /// A list whose items each convert with `conv`; a bad item is reported with its index.
    fn list<T>(
        &self,
        key: &'static str,
        expected: &'static str,
        conv: impl Fn(&Yaml) -> Option<T>,
    ) -> Parsed<Option<Vec<T>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Yaml::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, y)| {
                    conv(y).ok_or_else(|| Problem::Type {
                        section: self.section.clone(),
                        key: format!("{key}[{i}]"),
                        expected,
                        found: describe(y),
                    })
                })
                .collect::<Parsed<Vec<T>>>()
                .map(Some),
            Some(other) => Err(self.wrong(key, "a list", other)),
        }
    }
    pub fn opt_usize_list(&self, key: &'static str) -> Parsed<Option<Vec<usize>>> {
        self.list(key, "a non-negative integer", as_usize)
    }
    pub fn req_usize_list(&self, key: &'static str) -> Parsed<Vec<usize>> {
        self.opt_usize_list(key)?.ok_or_else(|| self.missing(key))
    }
    pub fn opt_bool_list(&self, key: &'static str) -> Parsed<Option<Vec<bool>>> {
        self.list(key, "a boolean", as_bool)
    }
    pub fn opt_str_list(&self, key: &'static str) -> Parsed<Option<Vec<String>>> {
        self.list(key, "a string", |y| y.as_str().map(str::to_string))
    }

    /// A nested map `key:` as its own [`Params`] (empty when absent).
    pub fn sub(&self, key: &'static str) -> Parsed<Params<'a>> {
        let y = self.get(key).unwrap_or(&Yaml::BadValue);
        Params::new(format!("{}.{key}", self.section), y)
    }

    /// Keys no read touched and not listed in `harmless`, as `section.key` paths, appended to `ignored`.
    pub fn finish(&self, harmless: &[&str], ignored: &mut Vec<String>) {
        let Some(map) = self.map else { return };
        let used = self.used.borrow();
        for k in map.keys() {
            let name = match k {
                Yaml::String(s) => s.clone(),
                other => format!("<{}>", describe(other)),
            };
            if !used.contains(&name.as_str()) && !harmless.contains(&name.as_str()) {
                ignored.push(format!("{}.{name}", self.section));
            }
        }
    }
}

fn parent_of(section: &str) -> String {
    section
        .rsplit_once('.')
        .map(|(p, _)| p.to_string())
        .unwrap_or_default()
}

fn last_of(section: &str) -> String {
    section
        .rsplit_once('.')
        .map(|(_, k)| k.to_string())
        .unwrap_or_else(|| section.to_string())
}

/// Deepest nesting accepted (real configs nest about 6 deep). The YAML tree is dropped recursively, so an
/// unbounded depth would overflow the stack.
const MAX_DEPTH: usize = 64;
/// Most nodes accepted, counting each alias as the size of what it repeats (bounds "billion laughs" inputs).
const MAX_NODES: usize = 1_000_000;

/// Measures the event stream before any tree is built: nesting depth and node count with aliases expanded.
#[derive(Default)]
struct ShapeCheck {
    depth: usize,
    nodes: usize,
    /// Open collections: (node count at their start, anchor id).
    open: Vec<(usize, usize)>,
    /// Node count of each anchored node.
    anchored: std::collections::HashMap<usize, usize>,
    problem: Option<String>,
}

impl yaml_rust2::parser::EventReceiver for ShapeCheck {
    fn on_event(&mut self, ev: yaml_rust2::parser::Event) {
        use yaml_rust2::parser::Event;
        if self.problem.is_some() {
            return;
        }
        match ev {
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                self.open.push((self.nodes, anchor));
                self.nodes += 1;
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    self.problem = Some(format!("nested deeper than {MAX_DEPTH} levels"));
                }
            }
            Event::SequenceEnd | Event::MappingEnd => {
                self.depth = self.depth.saturating_sub(1);
                if let Some((start, anchor)) = self.open.pop() {
                    if anchor > 0 {
                        self.anchored.insert(anchor, self.nodes - start);
                    }
                }
            }
            Event::Scalar(_, _, anchor, _) => {
                self.nodes += 1;
                if anchor > 0 {
                    self.anchored.insert(anchor, 1);
                }
            }
            Event::Alias(id) => {
                let size = self.anchored.get(&id).copied().unwrap_or(1);
                self.nodes = self.nodes.saturating_add(size);
            }
            _ => {}
        }
        if self.nodes > MAX_NODES {
            self.problem = Some(format!(
                "more than {MAX_NODES} nodes (with aliases expanded)"
            ));
        }
    }
}

/// Longest run of indentation and block indicators (`- `, `? `, `: `) accepted before a line's content. Block
/// nesting needs one of these per level, and yaml-rust2's parser recurses per level (a line of 200 000 `- `
/// overflows its stack), so this bounds the parser's depth before it runs; real configs indent at most 12.
const MAX_LINE_PREFIX: usize = 256;

/// Parses `text` into documents, refusing inputs too deep or too large to be a model config.
pub(crate) fn load(text: &str) -> Parsed<Vec<Yaml>> {
    for (i, line) in text.lines().enumerate() {
        let prefix = line
            .chars()
            .take_while(|c| matches!(c, ' ' | '\t' | '-' | '?' | ':'))
            .take(MAX_LINE_PREFIX + 1)
            .count();
        if prefix > MAX_LINE_PREFIX {
            return Err(Problem::Yaml(format!(
                "line {}: more than {MAX_LINE_PREFIX} characters of indentation and block indicators",
                i + 1
            )));
        }
    }
    let mut check = ShapeCheck::default();
    let mut parser = yaml_rust2::parser::Parser::new_from_str(text);
    parser
        .load(&mut check, true)
        .map_err(|e| Problem::Yaml(e.to_string()))?;
    if let Some(p) = check.problem {
        return Err(Problem::Yaml(p));
    }
    yaml_rust2::YamlLoader::load_from_str(text).map_err(|e| Problem::Yaml(e.to_string()))
}
