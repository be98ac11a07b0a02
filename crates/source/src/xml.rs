//! A small read-only element tree over XML text (libvirt's domain, checkpoint and backup
//! documents), built on the `quick-xml` tokenizer the workspace already uses for S3.
//! Each element keeps its byte range in the text, so a document can be edited by
//! replacing ranges ([`edit`]) and everything not touched stays as libvirt wrote it.

use std::ops::Range;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// One element: its name, attributes, text (the concatenated text directly inside it),
/// children, and where it lies in the document.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub text: String,
    pub children: Vec<Element>,
    /// From `<` of the start tag to after `>` of the end tag (or of an empty element).
    pub range: Range<usize>,
}

impl Element {
    /// The value of attribute `name`.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child named `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The trimmed text of the first child named `name`.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.trim())
    }
}

/// Parses `text` into its root element; `None`-free: a document without a root element,
/// or one that is not well-formed, is an error naming the byte position.
pub fn parse(text: &str) -> Result<Element, String> {
    let mut reader = Reader::from_str(text);
    let mut stack: Vec<Element> = Vec::new();
    let mut root = None;
    loop {
        let before = reader.buffer_position() as usize;
        let event =
            reader.read_event().map_err(|e| format!("not well-formed XML at byte {}: {e}", reader.error_position()))?;
        let after = reader.buffer_position() as usize;
        match event {
            Event::Start(s) => stack.push(start(&s, before..after)?),
            Event::Empty(s) => {
                let e = start(&s, before..after)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(e),
                    None => root = Some(e),
                }
            }
            Event::End(_) => {
                let mut e = stack.pop().ok_or("an end tag without its start")?;
                e.range.end = after;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(e),
                    None => root = Some(e),
                }
            }
            Event::Text(t) => {
                let raw = t.decode().map_err(|e| e.to_string())?;
                if let Some(cur) = stack.last_mut() {
                    cur.text.push_str(&raw);
                }
            }
            Event::CData(t) => {
                if let Some(cur) = stack.last_mut() {
                    cur.text.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::GeneralRef(r) => {
                let resolved = if r.is_char_ref() {
                    r.resolve_char_ref().map_err(|e| e.to_string())?.map(String::from).unwrap_or_default()
                } else {
                    let name = String::from_utf8_lossy(&r).into_owned();
                    quick_xml::escape::unescape(&format!("&{name};"))
                        .map_err(|e| format!("unknown entity &{name};: {e}"))?
                        .into_owned()
                };
                if let Some(cur) = stack.last_mut() {
                    cur.text.push_str(&resolved);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !stack.is_empty() {
        return Err(format!("element <{}> is not closed", stack[stack.len() - 1].name));
    }
    root.ok_or_else(|| "no root element".to_string())
}

fn start(s: &BytesStart<'_>, range: Range<usize>) -> Result<Element, String> {
    let name = String::from_utf8_lossy(s.name().as_ref()).into_owned();
    let mut attrs = Vec::new();
    for a in s.attributes() {
        let a = a.map_err(|e| format!("<{name}>: {e}"))?;
        let v = a.normalized_value(quick_xml::XmlVersion::Implicit1_0).map_err(|e| format!("<{name}>: {e}"))?;
        attrs.push((String::from_utf8_lossy(a.key.as_ref()).into_owned(), v.into_owned()));
    }
    Ok(Element { name, attrs, range, ..Element::default() })
}

/// `text` with each range replaced by its string. Ranges must not overlap.
pub fn edit(text: &str, mut edits: Vec<(Range<usize>, String)>) -> String {
    edits.sort_by_key(|(r, _)| r.start);
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (r, s) in edits {
        out.push_str(&text[at..r.start]);
        out.push_str(&s);
        at = r.end;
    }
    out.push_str(&text[at..]);
    out
}

/// Escapes text for an attribute value or element content.
pub fn escape(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_keep_their_ranges_and_decoded_text() {
        let doc = "<a x='1'>\n  <b>t&amp;u</b><c y=\"&lt;\"/>\n</a>";
        let a = parse(doc).unwrap();
        assert_eq!(a.attr("x"), Some("1"));
        assert_eq!(a.child_text("b"), Some("t&u"));
        let c = a.child("c").unwrap();
        assert_eq!(c.attr("y"), Some("<"));
        assert_eq!(&doc[c.range.clone()], "<c y=\"&lt;\"/>");
        assert_eq!(&doc[a.child("b").unwrap().range.clone()], "<b>t&amp;u</b>");
        assert_eq!(a.range, 0..doc.len());
        let edited = edit(doc, vec![(c.range.clone(), String::new())]);
        assert_eq!(edited, "<a x='1'>\n  <b>t&amp;u</b>\n</a>");
    }

    #[test]
    fn broken_documents_are_errors() {
        for bad in ["", "<a>", "<a></b>", "text"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
