//! The few Go-template actions the install template uses, rendered the way
//! Helm renders them, so that `trellis install` and `helm template` of the
//! chart give the same manifests from the one template:
//!
//! - `{{ .Values.NAME }}` and `{{ .Release.Namespace }}`;
//! - `{{ if .Values.NAME }}`, `{{ else }}`, `{{ end }}`, with a value's
//!   truth as in Go templates (false and "" are false);
//! - `{{-` and `-}}`, which trim the whitespace (newlines included) before
//!   and after the action.
//!
//! Anything else is an error, so a template that uses more of Go's
//! language fails here rather than rendering differently from Helm.

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TemplateError {
    #[error("template: `{{{{` at byte {0} is never closed")]
    Unclosed(usize),
    #[error("template: `{0}` is not an action this renderer knows (only values, Release.Namespace, if/else/end)")]
    Unknown(String),
    #[error("template: no value `{0}`: give it in the values")]
    NoValue(String),
    #[error("template: `{0}` without a matching `if`")]
    Unmatched(String),
    #[error("template: an `if` is never closed by `end`")]
    UnclosedIf,
}

/// A value the template reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Bool(bool),
    Str(String),
}

impl Value {
    fn truth(&self) -> bool {
        match self {
            Value::Bool(b) => *b,
            Value::Str(s) => !s.is_empty(),
        }
    }

    fn text(&self) -> String {
        match self {
            Value::Bool(b) => b.to_string(),
            Value::Str(s) => s.clone(),
        }
    }
}

/// The values: `.Values.NAME` and `.Release.Namespace`.
#[derive(Clone, Debug, Default)]
pub struct Values {
    pub values: BTreeMap<String, Value>,
    pub namespace: String,
}

impl Values {
    fn lookup(&self, path: &str) -> Result<Value, TemplateError> {
        if path == ".Release.Namespace" {
            return Ok(Value::Str(self.namespace.clone()));
        }
        let name = path
            .strip_prefix(".Values.")
            .ok_or_else(|| TemplateError::Unknown(path.to_string()))?;
        self.values
            .get(name)
            .cloned()
            .ok_or_else(|| TemplateError::NoValue(name.to_string()))
    }
}

enum Piece<'a> {
    Text(&'a str),
    Action(&'a str),
}

/// Splits the template into text and actions, applying `{{-`/`-}}` trims.
fn lex(template: &str) -> Result<Vec<Piece<'_>>, TemplateError> {
    let mut pieces = Vec::new();
    let mut rest = template;
    let mut offset = 0;
    let mut trim_next = false;
    while let Some(start) = rest.find("{{") {
        let mut text = &rest[..start];
        if trim_next {
            text = text.trim_start();
        }
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or(TemplateError::Unclosed(offset + start))?;
        let mut inner = &after[..end];
        if let Some(i) = inner.strip_prefix('-') {
            text = text.trim_end();
            inner = i;
        }
        trim_next = false;
        if let Some(i) = inner.strip_suffix('-') {
            trim_next = true;
            inner = i;
        }
        pieces.push(Piece::Text(text));
        pieces.push(Piece::Action(inner.trim()));
        let consumed = start + 2 + end + 2;
        offset += consumed;
        rest = &rest[consumed..];
    }
    pieces.push(Piece::Text(if trim_next {
        rest.trim_start()
    } else {
        rest
    }));
    Ok(pieces)
}

/// Renders `template` with `values`.
pub fn render(template: &str, values: &Values) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    // One entry per open `if`: (whether its branch is taken, whether the
    // enclosing text is emitted).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let emitting =
        |stack: &[(bool, bool)]| stack.last().is_none_or(|(taken, outer)| *taken && *outer);
    for piece in lex(template)? {
        match piece {
            Piece::Text(t) => {
                if emitting(&stack) {
                    out.push_str(t);
                }
            }
            Piece::Action(a) => {
                if let Some(cond) = a.strip_prefix("if ") {
                    let outer = emitting(&stack);
                    let taken = values.lookup(cond.trim())?.truth();
                    stack.push((taken, outer));
                } else if a == "else" {
                    let top = stack
                        .last_mut()
                        .ok_or_else(|| TemplateError::Unmatched(a.into()))?;
                    top.0 = !top.0;
                } else if a == "end" {
                    stack
                        .pop()
                        .ok_or_else(|| TemplateError::Unmatched(a.into()))?;
                } else if a.starts_with('.') && !a.contains(' ') {
                    if emitting(&stack) {
                        out.push_str(&values.lookup(a)?.text());
                    }
                } else {
                    return Err(TemplateError::Unknown(a.into()));
                }
            }
        }
    }
    if !stack.is_empty() {
        return Err(TemplateError::UnclosedIf);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(ha: bool) -> Values {
        Values {
            values: [
                ("ha".to_string(), Value::Bool(ha)),
                ("image".to_string(), Value::Str("img:1".into())),
            ]
            .into(),
            namespace: "ns".into(),
        }
    }

    #[test]
    fn values_and_conditions_render_as_go_templates_do() {
        let t = "a: {{ .Values.image }}\nn: {{ .Release.Namespace }}\n{{- if .Values.ha }}\nr: 3\n{{- else }}\nr: 2\n{{- end }}\nz: 1\n";
        assert_eq!(
            render(t, &values(false)).unwrap(),
            "a: img:1\nn: ns\nr: 2\nz: 1\n"
        );
        assert_eq!(
            render(t, &values(true)).unwrap(),
            "a: img:1\nn: ns\nr: 3\nz: 1\n"
        );
    }

    #[test]
    fn right_trim_eats_following_whitespace() {
        let t = "x {{- if .Values.ha -}}\n\n  y\n{{- end }}";
        assert_eq!(render(t, &values(true)).unwrap(), "xy");
        assert_eq!(render(t, &values(false)).unwrap(), "x");
    }

    #[test]
    fn nested_conditions_inside_an_untaken_branch_emit_nothing() {
        let t =
            "{{ if .Values.ha }}{{ if .Values.image }}A{{ else }}B{{ end }}{{ else }}C{{ end }}";
        assert_eq!(render(t, &values(false)).unwrap(), "C");
        assert_eq!(render(t, &values(true)).unwrap(), "A");
    }

    #[test]
    fn what_it_does_not_know_is_an_error() {
        let v = values(false);
        assert_eq!(
            render("{{ .Values.image | quote }}", &v),
            Err(TemplateError::Unknown(".Values.image | quote".into()))
        );
        assert_eq!(
            render("{{ .Values.nope }}", &v),
            Err(TemplateError::NoValue("nope".into()))
        );
        assert_eq!(
            render("{{ end }}", &v),
            Err(TemplateError::Unmatched("end".into()))
        );
        assert_eq!(
            render("{{ if .Values.ha }}", &v),
            Err(TemplateError::UnclosedIf)
        );
        assert_eq!(
            render("a {{ .Values.ha", &v),
            Err(TemplateError::Unclosed(2))
        );
    }
}
