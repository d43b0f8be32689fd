//! QAPI-style argument checking: every command declares its members, and the
//! arguments a client sends are checked against them before the command runs,
//! with the error texts QEMU's QAPI input visitor uses ("Parameter 'x' is
//! unexpected", "Invalid parameter type for 'x', expected: string", ...), so a
//! client that works against QEMU gets the same answers here.
//!
//! Members are checked in declaration order, each nested object completely
//! (its unexpected members included) before the next member, as QEMU's visitor
//! does; the first problem is the error.

use serde_json::{Map, Value};

/// The type of one member.
#[derive(Debug, Clone, Copy)]
pub enum Ty {
    /// A JSON string.
    Str,
    /// A JSON boolean.
    Bool,
    /// An unsigned integer that fits in 32 bits.
    U32,
    /// A signed 64-bit integer (QAPI's `int`).
    Int,
    /// A string from a fixed set.
    Enum(&'static [&'static str]),
    /// A list of strings from a fixed set.
    EnumList(&'static [&'static str]),
    /// A list of strings.
    StrList,
    /// An object with these members.
    Obj(&'static [Member]),
    /// QEMU's "legacy" flat union `{"type": T, "data": {...}}`: the members of
    /// `data` depend on `type`.
    Union(&'static [(&'static str, &'static [Member])]),
}

/// One declared member of a command's arguments (or of a nested object).
#[derive(Debug, Clone, Copy)]
pub struct Member {
    /// The member's name on the wire.
    pub name: &'static str,
    /// Its type.
    pub ty: Ty,
    /// Whether it must be present.
    pub required: bool,
}

/// A required member.
pub const fn req(name: &'static str, ty: Ty) -> Member {
    Member {
        name,
        ty,
        required: true,
    }
}

/// An optional member.
pub const fn opt(name: &'static str, ty: Ty) -> Member {
    Member {
        name,
        ty,
        required: false,
    }
}

/// Checks `args` against `members`; the error is QEMU's text for the first
/// problem found.
pub fn check(members: &[Member], args: &Map<String, Value>) -> Result<(), String> {
    check_object(members, args, "")
}

fn path(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

fn check_object(members: &[Member], obj: &Map<String, Value>, prefix: &str) -> Result<(), String> {
    for m in members {
        let full = path(prefix, m.name);
        match obj.get(m.name) {
            None if m.required => return Err(format!("Parameter '{full}' is missing")),
            None => {}
            Some(v) => check_value(m.ty, v, &full)?,
        }
    }
    unexpected(obj, |k| members.iter().any(|m| m.name == k), prefix)
}

fn unexpected(
    obj: &Map<String, Value>,
    known: impl Fn(&str) -> bool,
    prefix: &str,
) -> Result<(), String> {
    match obj.keys().find(|k| !known(k)) {
        Some(k) => Err(format!("Parameter '{}' is unexpected", path(prefix, k))),
        None => Ok(()),
    }
}

fn type_error(full: &str, expected: &str) -> String {
    format!("Invalid parameter type for '{full}', expected: {expected}")
}

fn check_value(ty: Ty, v: &Value, full: &str) -> Result<(), String> {
    match ty {
        Ty::Str => v
            .as_str()
            .map(drop)
            .ok_or_else(|| type_error(full, "string")),
        Ty::Bool => v
            .as_bool()
            .map(drop)
            .ok_or_else(|| type_error(full, "boolean")),
        Ty::U32 => match v {
            Value::Number(n) => match n.as_u64() {
                Some(x) if x <= u64::from(u32::MAX) => Ok(()),
                _ if n.is_f64() => Err(type_error(full, "integer")),
                _ => Err(format!("Parameter '{full}' expects uint32_t")),
            },
            _ => Err(format!("Parameter '{full}' expects uint64")),
        },
        // QEMU's input visitor: anything but an integer that fits in int64 is
        // a type error, floats and out-of-range numbers included.
        Ty::Int => v
            .as_i64()
            .map(drop)
            .ok_or_else(|| type_error(full, "integer")),
        Ty::Enum(values) => {
            let s = v.as_str().ok_or_else(|| type_error(full, "string"))?;
            if values.contains(&s) {
                Ok(())
            } else {
                // QEMU's enum visitor names the member alone, not its path.
                let leaf = full.rsplit('.').next().unwrap_or(full);
                Err(format!("Parameter '{leaf}' does not accept value '{s}'"))
            }
        }
        Ty::EnumList(values) => {
            let list = v.as_array().ok_or_else(|| type_error(full, "array"))?;
            for (i, item) in list.iter().enumerate() {
                check_value(Ty::Enum(values), item, &format!("{full}[{i}]"))?;
            }
            Ok(())
        }
        Ty::StrList => {
            let list = v.as_array().ok_or_else(|| type_error(full, "array"))?;
            for (i, item) in list.iter().enumerate() {
                check_value(Ty::Str, item, &format!("{full}[{i}]"))?;
            }
            Ok(())
        }
        Ty::Obj(members) => {
            let obj = v.as_object().ok_or_else(|| type_error(full, "object"))?;
            check_object(members, obj, full)
        }
        Ty::Union(branches) => {
            let obj = v.as_object().ok_or_else(|| type_error(full, "object"))?;
            let tag_path = path(full, "type");
            let tag = match obj.get("type") {
                None => return Err(format!("Parameter '{tag_path}' is missing")),
                Some(t) => t.as_str().ok_or_else(|| type_error(&tag_path, "string"))?,
            };
            let Some((_, members)) = branches.iter().find(|(name, _)| *name == tag) else {
                // As for enums, QEMU names the tag alone.
                return Err(format!("Parameter 'type' does not accept value '{tag}'"));
            };
            let data_path = path(full, "data");
            match obj.get("data") {
                None => return Err(format!("Parameter '{data_path}' is missing")),
                Some(d) => check_value(Ty::Obj(members), d, &data_path)?,
            }
            unexpected(obj, |k| k == "type" || k == "data", full)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const INET: &[Member] = &[req("host", Ty::Str), req("port", Ty::Str)];
    const UNIX: &[Member] = &[req("path", Ty::Str)];
    const ARGS: &[Member] = &[
        req("addr", Ty::Union(&[("inet", INET), ("unix", UNIX)])),
        opt("max-connections", Ty::U32),
        opt("mode", Ty::Enum(&["safe", "hard"])),
        opt("flag", Ty::Bool),
        opt("size", Ty::Int),
    ];

    fn run(v: Value) -> Result<(), String> {
        check(ARGS, v.as_object().unwrap())
    }

    #[test]
    fn texts_match_qemus_visitor_for_nested_members() {
        let unix = json!({"type": "unix", "data": {"path": "/x"}});
        assert_eq!(run(json!({"addr": unix})), Ok(()));
        assert_eq!(run(json!({"addr": unix, "size": -1})), Ok(()));
        let cases = [
            (json!({}), "Parameter 'addr' is missing"),
            (
                json!({"addr": {"type": "unix"}}),
                "Parameter 'addr.data' is missing",
            ),
            (
                json!({"addr": {"type": "bogus", "data": {}}}),
                "Parameter 'type' does not accept value 'bogus'",
            ),
            (
                json!({"addr": {"type": "unix", "data": {"path": 5}}}),
                "Invalid parameter type for 'addr.data.path', expected: string",
            ),
            (
                json!({"addr": {"type": "unix", "data": {"path": "/x", "x": 1}}}),
                "Parameter 'addr.data.x' is unexpected",
            ),
            (
                json!({"addr": {"type": "inet", "data": {"host": "h"}}}),
                "Parameter 'addr.data.port' is missing",
            ),
            (
                json!({"addr": unix, "max-connections": "x"}),
                "Parameter 'max-connections' expects uint64",
            ),
            (
                json!({"addr": unix, "max-connections": -1}),
                "Parameter 'max-connections' expects uint32_t",
            ),
            (
                json!({"addr": unix, "mode": 5}),
                "Invalid parameter type for 'mode', expected: string",
            ),
            (
                json!({"addr": unix, "flag": "yes"}),
                "Invalid parameter type for 'flag', expected: boolean",
            ),
            (
                json!({"addr": unix, "extra": {}}),
                "Parameter 'extra' is unexpected",
            ),
            (
                json!({"addr": 1}),
                "Invalid parameter type for 'addr', expected: object",
            ),
            (
                json!({"addr": unix, "size": "1G"}),
                "Invalid parameter type for 'size', expected: integer",
            ),
            (
                json!({"addr": unix, "size": 1.5}),
                "Invalid parameter type for 'size', expected: integer",
            ),
            (
                json!({"addr": unix, "size": 18446744073709551615u64}),
                "Invalid parameter type for 'size', expected: integer",
            ),
        ];
        for (args, want) in cases {
            assert_eq!(run(args.clone()), Err(want.to_string()), "{args}");
        }
    }

    #[test]
    fn a_missing_member_is_reported_before_an_unexpected_one() {
        assert_eq!(
            run(json!({"extra": 1})),
            Err("Parameter 'addr' is missing".into())
        );
    }
}
