//! How deeply a document nests, measured before any YAML library sees it.
//!
//! libyaml (under serde_yaml_ng) reads a whole document into events before
//! serde's recursion limit can refuse it, and its scanner walks every open
//! flow level for each token it reads: a JSON or YAML flow document nested
//! 100,000 levels deep (600 KB) keeps it busy for minutes. So the loader
//! first runs this linear scan, which follows libyaml's token rules far
//! enough to know where flow collections (`[`, `{`) open and close — quoted
//! scalars, plain scalars, comments, tags, anchors and block scalars are
//! skipped as libyaml skips them — and refuses the document at the first
//! point where flow levels plus block indentation levels exceed the limit.
//!
//! Where the scan and libyaml could disagree, the scan errs towards
//! counting more: a bracket it cannot place counts as an opening. Block
//! nesting without flow collections costs libyaml only linear time, and
//! serde_yaml_ng's own recursion limit (128) still bounds it; counting it
//! here as well keeps one limit for both forms.

/// Where a document first nests deeper than the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TooDeep {
    /// 1-based, within the text scanned.
    pub line: usize,
}

/// Checks that `text` (one document) never nests deeper than `limit`.
pub(crate) fn check_nesting(text: &str, limit: usize) -> Result<(), TooDeep> {
    let mut s = Scan {
        b: text.as_bytes(),
        i: 0,
        col: 0,
        line: 1,
        flow: 0,
        indents: Vec::new(),
        key_col: None,
        key_line: 0,
        limit,
    };
    s.run()
}

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
    /// Characters since the line began, as libyaml counts columns.
    col: usize,
    line: usize,
    flow: usize,
    /// Block indentation levels, innermost last (libyaml's indent stack).
    indents: Vec<usize>,
    /// Column and line of the token that may turn out to be a block
    /// mapping's key (libyaml's simple key), while one is possible.
    key_col: Option<usize>,
    key_line: usize,
    limit: usize,
}

/// What stopped the scan: the end, or a point where libyaml itself stops
/// with an error (so nothing after it is parsed either).
enum Stop {
    End,
    Deep(TooDeep),
}

type Step = Result<(), Stop>;

impl Scan<'_> {
    fn run(&mut self) -> Result<(), TooDeep> {
        match self.tokens() {
            Ok(()) | Err(Stop::End) => Ok(()),
            Err(Stop::Deep(d)) => Err(d),
        }
    }

    fn at(&self, k: usize) -> u8 {
        self.b.get(self.i + k).copied().unwrap_or(0)
    }

    /// The length of the line break at `i + k`, 0 when there is none
    /// (libyaml's breaks: LF, CR, CRLF, NEL, LS, PS).
    fn break_len(&self, k: usize) -> usize {
        match (self.at(k), self.at(k + 1), self.at(k + 2)) {
            (b'\r', b'\n', _) => 2,
            (b'\r', _, _) | (b'\n', _, _) => 1,
            (0xC2, 0x85, _) => 2,
            (0xE2, 0x80, 0xA8) | (0xE2, 0x80, 0xA9) => 3,
            _ => 0,
        }
    }

    fn is_blank(&self, k: usize) -> bool {
        matches!(self.at(k), b' ' | b'\t')
    }

    fn is_blankz(&self, k: usize) -> bool {
        self.is_blank(k) || self.break_len(k) > 0 || self.i + k >= self.b.len()
    }

    fn eof(&self) -> bool {
        self.i >= self.b.len()
    }

    /// Moves past one character (or one line break).
    fn advance(&mut self) {
        let n = self.break_len(0);
        if n > 0 {
            self.i += n;
            self.line += 1;
            self.col = 0;
            return;
        }
        self.i += 1;
        while self.i < self.b.len() && self.b[self.i] & 0xC0 == 0x80 {
            self.i += 1;
        }
        self.col += 1;
    }

    fn depth(&self) -> usize {
        self.flow + self.indents.len()
    }

    fn check_depth(&self) -> Step {
        if self.depth() > self.limit {
            Err(Stop::Deep(TooDeep { line: self.line }))
        } else {
            Ok(())
        }
    }

    fn block_indent(&self) -> isize {
        self.indents.last().map_or(-1, |&c| c as isize)
    }

    /// libyaml's roll_indent: a block collection starts at `col`.
    fn roll(&mut self, col: usize) -> Step {
        if self.flow == 0 && self.block_indent() < col as isize {
            self.indents.push(col);
            self.check_depth()?;
        }
        Ok(())
    }

    /// Whitespace and comments up to the next token.
    fn skip_to_token(&mut self) {
        loop {
            while self.is_blank(0) {
                self.advance();
            }
            if self.at(0) == b'#' {
                while !self.eof() && self.break_len(0) == 0 {
                    self.advance();
                }
            }
            if self.break_len(0) > 0 {
                self.advance();
                if self.flow == 0 {
                    self.key_col = None;
                }
            } else {
                return;
            }
        }
    }

    fn tokens(&mut self) -> Step {
        loop {
            self.skip_to_token();
            if self.eof() {
                return Err(Stop::End);
            }
            if self.flow == 0 {
                // libyaml's unroll_indent, before every token.
                while self.indents.last().is_some_and(|&c| c > self.col) {
                    self.indents.pop();
                }
            }
            let c = self.at(0);
            let col = self.col;
            if col == 0 && c == b'%' {
                while !self.eof() && self.break_len(0) == 0 {
                    self.advance();
                }
                continue;
            }
            if col == 0
                && (self.b[self.i..].starts_with(b"---") || self.b[self.i..].starts_with(b"..."))
                && self.is_blankz(3)
            {
                for _ in 0..3 {
                    self.advance();
                }
                self.key_col = None;
                continue;
            }
            match c {
                b'[' | b'{' => {
                    self.maybe_key(col);
                    self.flow += 1;
                    self.check_depth()?;
                    self.advance();
                }
                b']' | b'}' => {
                    self.flow = self.flow.saturating_sub(1);
                    self.advance();
                }
                b',' => self.advance(),
                b'-' if self.is_blankz(1) => {
                    self.roll(col)?;
                    self.advance();
                    self.key_col = None;
                }
                b'?' if self.flow > 0 || self.is_blankz(1) => {
                    self.roll(col)?;
                    self.advance();
                    self.key_col = None;
                }
                b':' if self.flow > 0 || self.is_blankz(1) => {
                    if self.flow == 0 {
                        match self.key_col.take() {
                            Some(k) if self.key_line == self.line => self.roll(k)?,
                            _ => self.roll(col)?,
                        }
                    }
                    self.advance();
                }
                b'*' | b'&' => {
                    self.maybe_key(col);
                    self.advance();
                    while self.at(0).is_ascii_alphanumeric() || matches!(self.at(0), b'_' | b'-') {
                        self.advance();
                    }
                }
                b'!' => {
                    self.maybe_key(col);
                    self.tag();
                }
                b'|' | b'>' if self.flow == 0 => self.block_scalar()?,
                b'\'' | b'"' => {
                    self.maybe_key(col);
                    self.quoted(c)?;
                }
                b'|' | b'>' | b'%' | b'@' | b'`' => return Err(Stop::End),
                _ => {
                    self.maybe_key(col);
                    self.plain()?;
                }
            }
        }
    }

    /// A token that could begin a block mapping's key (the first one since
    /// the line, `-`, `?` or `:`).
    fn maybe_key(&mut self, col: usize) {
        if self.flow == 0 && self.key_col.is_none() {
            self.key_col = Some(col);
            self.key_line = self.line;
        }
    }

    fn tag(&mut self) {
        self.advance();
        if self.at(0) == b'<' {
            while !self.is_blankz(0) && self.at(0) != b'>' {
                self.advance();
            }
            if self.at(0) == b'>' {
                self.advance();
            }
            return;
        }
        while self.at(0).is_ascii_alphanumeric() || b"_-;/?:@&=+$.%!~*'()".contains(&self.at(0)) {
            self.advance();
        }
    }

    fn quoted(&mut self, quote: u8) -> Step {
        self.advance();
        loop {
            if self.eof() {
                return Err(Stop::End);
            }
            let c = self.at(0);
            if quote == b'"' && c == b'\\' {
                self.advance();
                if !self.eof() {
                    self.advance();
                }
            } else if c == quote {
                self.advance();
                if quote == b'\'' && self.at(0) == b'\'' {
                    self.advance();
                } else {
                    return Ok(());
                }
            } else {
                self.advance();
            }
        }
    }

    /// libyaml's scan_plain_scalar: up to `: `, ` #`, a flow indicator in
    /// flow context, or a line indented no deeper than the block.
    fn plain(&mut self) -> Step {
        let indent = self.block_indent() + 1;
        loop {
            if self.col == 0
                && (self.b[self.i..].starts_with(b"---") || self.b[self.i..].starts_with(b"..."))
                && self.is_blankz(3)
            {
                return Ok(());
            }
            if self.at(0) == b'#' {
                return Ok(());
            }
            while !self.is_blankz(0) {
                let c = self.at(0);
                if self.flow > 0 && c == b':' && b",?[]{}".contains(&self.at(1)) {
                    // libyaml: "found unexpected ':'"; it stops here.
                    return Err(Stop::End);
                }
                if (c == b':' && self.is_blankz(1)) || (self.flow > 0 && b",[]{}".contains(&c)) {
                    return Ok(());
                }
                self.advance();
            }
            if !(self.is_blank(0) || self.break_len(0) > 0) {
                return Ok(());
            }
            while self.is_blank(0) || self.break_len(0) > 0 {
                self.advance();
            }
            if self.flow == 0 && (self.col as isize) < indent {
                return Ok(());
            }
        }
    }

    /// A literal (`|`) or folded (`>`) scalar: its header, then every line
    /// indented at least as far as its content.
    fn block_scalar(&mut self) -> Step {
        let parent = self.block_indent();
        self.advance();
        let mut increment = 0usize;
        for _ in 0..2 {
            match self.at(0) {
                b'+' | b'-' => self.advance(),
                d @ b'1'..=b'9' => {
                    increment = (d - b'0') as usize;
                    self.advance();
                }
                _ => break,
            }
        }
        while self.is_blank(0) {
            self.advance();
        }
        if self.at(0) == b'#' {
            while !self.eof() && self.break_len(0) == 0 {
                self.advance();
            }
        }
        if self.eof() {
            return Err(Stop::End);
        }
        if self.break_len(0) == 0 {
            // libyaml: "did not find expected comment or line break".
            return Err(Stop::End);
        }
        self.advance();
        let mut indent = if increment == 0 {
            0
        } else if parent >= 0 {
            parent as usize + increment
        } else {
            increment
        };
        self.block_breaks(&mut indent, parent)?;
        while self.col == indent && !self.eof() {
            while !self.eof() && self.break_len(0) == 0 {
                self.advance();
            }
            if self.eof() {
                break;
            }
            self.advance();
            self.block_breaks(&mut indent, parent)?;
        }
        self.key_col = None;
        Ok(())
    }

    /// libyaml's scan_block_scalar_breaks: empty lines and indentation,
    /// finding the content's indentation when it is not given.
    fn block_breaks(&mut self, indent: &mut usize, parent: isize) -> Step {
        let mut max_indent = 0;
        loop {
            while (*indent == 0 || self.col < *indent) && self.at(0) == b' ' {
                self.advance();
            }
            max_indent = max_indent.max(self.col);
            if (*indent == 0 || self.col < *indent) && self.at(0) == b'\t' {
                // libyaml: "found a tab character where an indentation
                // space is expected".
                return Err(Stop::End);
            }
            if self.break_len(0) == 0 {
                break;
            }
            self.advance();
        }
        if *indent == 0 {
            *indent = max_indent.max((parent + 1).max(1) as usize);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_ok(text: &str, limit: usize) -> bool {
        check_nesting(text, limit).is_ok()
    }

    #[test]
    fn flow_nesting_counts_and_the_line_is_reported() {
        assert!(depth_ok("[[[]]]", 3));
        assert!(!depth_ok("[[[[]]]]", 3));
        let deep = format!("a: 1\nb: {}1{}", "{\"a\":".repeat(50), "}".repeat(50));
        assert_eq!(check_nesting(&deep, 32), Err(TooDeep { line: 2 }));
    }

    #[test]
    fn brackets_inside_scalars_and_comments_do_not_count() {
        let yaml = "a: \"[[[[[[\"\nb: '{{{{{{'\nc: x[[[[[[\n# [[[[[[\nd: |\n  [[[[[[\n  {{{{\ne: >-\n   [[[[[\n";
        assert!(depth_ok(yaml, 2));
        assert!(depth_ok(r#"["]]]]", "\"[[[[[[", "a\\"]"#, 1));
        assert!(depth_ok("!<tag:[[[[[> x\n", 1));
    }

    #[test]
    fn closers_inside_scalars_do_not_hide_openers() {
        // A string full of closers between real openers.
        let json = format!("{}\"]]]]]]]]]]\"{}", "[".repeat(10), "[".repeat(10));
        assert!(!depth_ok(&json, 15));
        // A block scalar that ends before a line of structure.
        let yaml = format!("- k: |\n    text ]]]]]]]\n  x: {}1\n", "{\"a\":".repeat(20));
        assert!(!depth_ok(&yaml, 10));
        // A plain scalar with a quote in it does not open a quoted one.
        let yaml = format!("a: it's\nb: {}1\nc: '\n", "{\"a\":".repeat(20));
        assert!(!depth_ok(&yaml, 10));
        // Comments end at any line break libyaml knows.
        let yaml = format!("# c\u{2028}{}\n", "[".repeat(20));
        assert!(!depth_ok(&yaml, 10));
    }

    #[test]
    fn block_nesting_counts() {
        assert!(!depth_ok(&format!("{}x\n", "- ".repeat(40)), 32));
        let mut yaml = String::new();
        for i in 0..40 {
            yaml.push_str(&format!("{}k{i}:\n", " ".repeat(i)));
        }
        assert!(!depth_ok(&yaml, 32));
        assert!(depth_ok(&yaml, 40));
    }

    #[test]
    fn real_resources_are_shallow() {
        let yaml = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: catalog}]\n  rules:\n  - matches:\n    - path: {type: RegularExpression, value: \"^/a[b]{2}\"}\n      headers:\n      - {name: x, value: y}\n    backendRefs:\n    - name: catalog\n      weight: 1\n";
        assert!(depth_ok(yaml, 10));
    }
}
