//! Reading resources from YAML or JSON text, files and folders, with errors
//! that name the file, the document, the line and the field path, and
//! writing them back as multi-document YAML.
//!
//! Documents are split on `---` lines here rather than by the YAML library
//! so that each is parsed on its own: one bad document does not hide the
//! errors of the next, and every error is reported, not just the first.

use std::fmt;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::LazyLock;

use regex::Regex;
use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::limits::{
    self, clip_message, MAX_DOCUMENTS, MAX_INPUT_BYTES, MAX_NESTING, MAX_RESOURCES,
};
use crate::types::{Kind, Resource};
use crate::wire::{known_kinds, ResourceSeed};

/// Where a resource was read from. `document` is 1-based (0: unknown) and
/// counts non-empty documents; `line` is the document's first line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub file: String,
    pub document: usize,
    pub line: Option<usize>,
}

/// One problem with one resource.
///
/// `file` is where it came from; when no file is known (an apply sent as
/// JSON) it names the resource instead, e.g. `HTTPRoute default/catalog`.
/// `field` is a path such as `spec.rules[0].backendRefs[1].weight`, empty
/// when the problem is with the whole document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceError {
    pub file: String,
    pub document: usize,
    pub line: Option<usize>,
    pub field: String,
    pub reason: String,
}

impl ResourceError {
    /// An error about a whole file or folder, not a document in it.
    pub fn for_path(file: impl Into<String>, reason: impl Into<String>) -> Self {
        ResourceError {
            file: file.into(),
            document: 0,
            line: None,
            field: String::new(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ResourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut head = self.file.clone();
        if self.document > 0 {
            if !head.is_empty() {
                head.push_str(": ");
            }
            head.push_str(&format!("document {}", self.document));
        }
        if let Some(line) = self.line {
            if head.is_empty() {
                head = format!("line {line}");
            } else {
                head.push_str(&format!(" (line {line})"));
            }
        }
        if !head.is_empty() {
            write!(f, "{head}: ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.reason)
    }
}

/// Every problem found in a load or an apply; never empty when returned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadError {
    pub errors: Vec<ResourceError>,
}

impl From<ResourceError> for LoadError {
    fn from(e: ResourceError) -> Self {
        LoadError { errors: vec![e] }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadError {}

/// Parses multi-document YAML (or JSON, or a JSON array of resources).
/// `file` only labels errors. Empty documents are skipped; an empty text
/// gives an empty list.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Resource>, LoadError> {
    parse_documents_with_sources(file, text).map(|v| v.into_iter().map(|(r, _)| r).collect())
}

/// As [`parse_documents`], with where each resource came from.
pub fn parse_documents_with_sources(
    file: &str,
    text: &str,
) -> Result<Vec<(Resource, Source)>, LoadError> {
    if text.len() > MAX_INPUT_BYTES {
        return Err(too_large(file, text.len()).into());
    }
    let docs = split_documents(text);
    if docs.len() > MAX_DOCUMENTS {
        return Err(ResourceError::for_path(
            file,
            format!(
                "{} documents, over the limit of {MAX_DOCUMENTS} in one apply: apply them in parts",
                docs.len()
            ),
        )
        .into());
    }
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for doc in docs {
        match parse_document(file, &doc) {
            Ok(resources) => out.extend(resources),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        check_count(file, out.len())?;
        Ok(out)
    } else {
        Err(LoadError { errors })
    }
}

fn too_large(file: &str, bytes: usize) -> ResourceError {
    ResourceError::for_path(
        file,
        format!(
            "{bytes} bytes, over the limit of {MAX_INPUT_BYTES} bytes (16 MiB) in one apply: \
             apply the resources in parts"
        ),
    )
}

fn check_count(file: &str, n: usize) -> Result<(), LoadError> {
    if n > MAX_RESOURCES {
        return Err(ResourceError::for_path(
            file,
            format!("{n} resources, over the limit of {MAX_RESOURCES} in one apply: apply them in parts"),
        )
        .into());
    }
    Ok(())
}

/// Loads a file, or a folder's `*.yaml`, `*.yml` and `*.json` files in name
/// order (not recursive). Finding no resources at all is an error: an apply
/// of nothing is almost always a wrong path.
pub fn load_path(path: &Path) -> Result<Vec<Resource>, LoadError> {
    load_path_with_sources(path).map(|v| v.into_iter().map(|(r, _)| r).collect())
}

/// As [`load_path`], with where each resource came from.
pub fn load_path_with_sources(path: &Path) -> Result<Vec<(Resource, Source)>, LoadError> {
    let shown = path.display().to_string();
    let meta = fs::metadata(path).map_err(|e| io_error(&shown, &e))?;
    let files = if meta.is_dir() {
        let files = folder_files(path).map_err(|e| io_error(&shown, &e))?;
        if files.is_empty() {
            return Err(ResourceError::for_path(
                shown,
                "the folder has no .yaml, .yml or .json files: add resource files to it, \
                 or pass the path of a file",
            )
            .into());
        }
        files
    } else {
        vec![path.to_path_buf()]
    };

    let mut out = Vec::new();
    let mut errors = Vec::new();
    let mut total = 0u64;
    for file in files {
        let name = file.display().to_string();
        // Checked before reading, so a huge file is never read whole.
        total += fs::metadata(&file).map_or(0, |m| m.len());
        if total > MAX_INPUT_BYTES as u64 {
            return Err(too_large(&shown, total as usize).into());
        }
        match fs::read_to_string(&file) {
            Ok(text) => match parse_documents_with_sources(&name, &text) {
                Ok(v) => out.extend(v),
                Err(e) => errors.extend(e.errors),
            },
            Err(e) => errors.push(io_error(&name, &e)),
        }
    }
    if !errors.is_empty() {
        return Err(LoadError { errors });
    }
    check_count(&shown, out.len())?;
    if out.is_empty() {
        return Err(ResourceError::for_path(
            shown,
            format!(
                "no resources found: add documents with apiVersion, kind ({}), \
                 metadata and spec",
                known_kinds()
            ),
        )
        .into());
    }
    Ok(out)
}

fn folder_files(dir: &Path) -> io::Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let wanted = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "yaml" | "yml" | "json"));
        // fs::metadata follows symlinks, so a linked file counts and a
        // linked folder does not.
        if wanted && fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

fn io_error(shown: &str, e: &io::Error) -> ResourceError {
    let reason = match e.kind() {
        io::ErrorKind::NotFound => "no such file or folder: check the path".to_string(),
        io::ErrorKind::PermissionDenied => "permission denied: check the file's permissions".into(),
        io::ErrorKind::InvalidData => "not UTF-8 text: resource files must be UTF-8".into(),
        _ => format!("cannot read: {e}"),
    };
    ResourceError::for_path(shown, reason)
}

/// Writes resources as multi-document YAML, `---` between documents.
pub fn to_yaml(resources: &[Resource]) -> String {
    let mut out = String::new();
    for (i, r) in resources.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        // Resources hold only strings, numbers, lists and string-keyed maps,
        // which YAML can always represent.
        out.push_str(&serde_yaml_ng::to_string(r).expect("a resource is representable in YAML"));
    }
    out
}

/// One non-empty document of a file.
struct Document<'a> {
    /// 1-based, counting only non-empty documents.
    number: usize,
    /// The file's line on which `text` starts (1-based).
    start_line: usize,
    /// The first line with content, for [`Source::line`].
    content_line: usize,
    text: &'a str,
}

/// Splits at lines that begin with `---`. The separator line stays with
/// the document it opens (YAML reads it as an explicit document start), so
/// `--- {inline: doc}` works and line numbers need only one offset.
fn split_documents(text: &str) -> Vec<Document<'_>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut chunks: Vec<(usize, usize, usize)> = Vec::new(); // (start byte, end byte, start line)
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if is_separator(line) && offset > start {
            chunks.push((start, offset, start_line));
            start = offset;
            start_line = i + 1;
        }
        offset += line.len();
    }
    chunks.push((start, text.len(), start_line));

    let mut docs = Vec::new();
    for (start, end, start_line) in chunks {
        let chunk = &text[start..end];
        if let Some(skip) = chunk.lines().position(|l| !is_blank(l)) {
            docs.push(Document {
                number: docs.len() + 1,
                start_line,
                content_line: start_line + skip,
                text: chunk,
            });
        }
    }
    docs
}

fn is_separator(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(|c: char| c.is_whitespace()))
}

/// Whether a line carries no content: blank, a comment, or a bare document
/// marker.
fn is_blank(line: &str) -> bool {
    let mut l = line.trim();
    for marker in ["---", "..."] {
        if let Some(rest) = l.strip_prefix(marker) {
            if rest.is_empty() || rest.starts_with(char::is_whitespace) {
                l = rest.trim_start();
            }
        }
    }
    l.is_empty() || l.starts_with('#')
}

fn parse_document(
    file: &str,
    doc: &Document<'_>,
) -> Result<Vec<(Resource, Source)>, ResourceError> {
    // Before any YAML library sees it: libyaml's time grows with the square
    // of the nesting depth (see nesting.rs).
    if let Err(deep) = crate::nesting::check_nesting(doc.text, MAX_NESTING) {
        return Err(ResourceError {
            file: file.to_string(),
            document: doc.number,
            line: Some(doc.start_line - 1 + deep.line),
            field: String::new(),
            reason: too_deep(),
        });
    }
    // A first, lenient pass catches YAML syntax errors and learns the kind
    // (and whether this is a list), so the typed pass can read `spec`
    // wherever it appears in the document and still report its exact path.
    let shape = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(doc.text)
        .map_err(|e| yaml_error(file, doc, "", &e, "invalid YAML: "))?;
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(
        serde_yaml_ng::Deserializer::from_str(doc.text),
        &mut track,
    );
    let parsed = match &shape {
        serde_yaml_ng::Value::Null => return Ok(Vec::new()),
        serde_yaml_ng::Value::Sequence(items) => ListSeed {
            hints: items.iter().map(kind_of).collect(),
        }
        .deserialize(de),
        other => ResourceSeed {
            kind_hint: kind_of(other),
        }
        .deserialize(de)
        .map(|r| vec![r]),
    };
    let resources = parsed.map_err(|e| yaml_error(file, doc, &track.path().to_string(), &e, ""))?;
    let source = Source {
        file: file.to_string(),
        document: doc.number,
        line: Some(doc.content_line),
    };
    Ok(resources.into_iter().map(|r| (r, source.clone())).collect())
}

fn kind_of(value: &serde_yaml_ng::Value) -> Option<Kind> {
    let kind = value.get("kind")?.as_str()?;
    Kind::ALL.into_iter().find(|k| k.as_str() == kind)
}

/// A document holding a list of resources, as `apply` sends them in JSON.
struct ListSeed {
    hints: Vec<Option<Kind>>,
}

impl<'de> DeserializeSeed<'de> for ListSeed {
    type Value = Vec<Resource>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ListSeed {
    type Value = Vec<Resource>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of resources")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        loop {
            let kind_hint = self.hints.get(out.len()).copied().flatten();
            match seq.next_element_seed(ResourceSeed { kind_hint })? {
                Some(r) => out.push(r),
                None => return Ok(out),
            }
        }
    }
}

fn too_deep() -> String {
    format!(
        "nested deeper than {MAX_NESTING} levels of lists and maps: resources nest about ten \
         levels; check the document's structure"
    )
}

const MORE_THAN_ONE_DOCUMENT: &str =
    "deserializing from YAML containing more than one document is not supported";

static MARK: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"line (\d+) column (\d+)").expect("valid regex"));

/// Turns a YAML error about one document into one about the file: lines
/// made absolute, and the location and path (which we report in their own
/// fields) taken out of the message.
fn yaml_error(
    file: &str,
    doc: &Document<'_>,
    tracked_path: &str,
    e: &serde_yaml_ng::Error,
    syntax_label: &str,
) -> ResourceError {
    let shift = doc.start_line - 1;
    let location = e.location();
    let mut reason = e.to_string();
    if reason == MORE_THAN_ONE_DOCUMENT {
        reason = "content continues after the document ends: check the indentation, \
                  or put a `---` line between documents"
            .to_string();
    }
    // serde_yaml_ng's own limit (128), for nesting the scan did not count.
    if reason.starts_with("recursion limit exceeded") {
        reason = reason.replacen("recursion limit exceeded", &too_deep(), 1);
    }
    if let Some(loc) = &location {
        let own = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(at) = reason.find(&own) {
            reason.replace_range(at..at + own.len(), "");
        }
    }
    let reason = clip_message(&reason);
    // Other marks, as in libyaml's "while parsing a block mapping at line 2".
    let reason = MARK.replace_all(&reason, |c: &regex::Captures<'_>| {
        let line: usize = c[1].parse().unwrap_or(0);
        format!("line {} column {}", line + shift, &c[2])
    });

    // serde_path_to_error's path is the precise one; serde_yaml_ng also
    // prefixes the message with its own, which we drop, keeping it only
    // when we have nothing better.
    let mut field = normalize_path(tracked_path);
    let reason = match split_path_prefix(&reason) {
        Some((prefix, rest)) => {
            if field.is_empty() {
                field = normalize_path(prefix);
            }
            rest.to_string()
        }
        // Only errors found at no particular node are about YAML syntax.
        None => format!("{syntax_label}{reason}"),
    };
    ResourceError {
        file: file.to_string(),
        document: doc.number,
        line: Some(location.map_or(doc.content_line, |l| l.line() + shift)),
        field: if field.len() > 4 * limits::QUOTE_CHARS {
            limits::clip(&field)
        } else {
            field
        },
        reason,
    }
}

/// Both libraries write the root as `.` (and serde_yaml_ng a list item at
/// the root as `.[0]`); we write the root as the empty path.
fn normalize_path(path: &str) -> String {
    path.trim_start_matches('.').to_string()
}

/// Splits `spec.ports[0]: invalid type ...` into path and message. serde's
/// own messages never start with a bare word followed by `: `.
fn split_path_prefix(reason: &str) -> Option<(&str, &str)> {
    let (head, rest) = reason.split_once(": ")?;
    let is_path = !head.is_empty()
        && head
            .chars()
            .all(|c| c.is_alphanumeric() || "._-[]?/".contains(c));
    is_path.then_some((head, rest))
}

#[cfg(test)]
#[path = "load_tests.rs"]
mod tests;
