//! A small reader for the kernel's BTF (`/sys/kernel/btf/vmlinux`): just enough to find struct
//! member offsets and tracepoint signatures, so the probes adapt to the running kernel instead
//! of assuming one layout.

use thiserror::Error;

/// Where the running kernel publishes its BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Why a BTF blob could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    /// not BTF: bad magic number
    #[error("not BTF: bad magic number")]
    Magic,
    /// BTF truncated at byte {0}
    #[error("BTF truncated at byte {0}")]
    Truncated(usize),
    /// BTF type kind {0} is unknown to this reader
    #[error("BTF type kind {0} is unknown to this reader")]
    UnknownKind(u32),
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_TYPE_TAG: u32 = 18;

#[derive(Debug, Clone)]
struct Type {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    vlen: u32,
    size_or_type: u32,
    /// Offset of the kind-specific data following the header, in the type section.
    extra: usize,
}

/// One member of a struct, as found by [`Btf::member`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Offset from the start of the outer struct, in bits.
    pub bit_offset: u32,
    /// Width when it is a bitfield.
    pub bitfield_bits: Option<u32>,
    /// Size of its (resolved) type in bytes, where that is an integer or a pointer.
    pub size: Option<u32>,
}

/// A parsed BTF blob.
pub struct Btf {
    types: Vec<Type>,
    type_data: Vec<u8>,
    strings: Vec<u8>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Truncated(at))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_sys_fs() -> std::io::Result<Btf> {
        let data = std::fs::read(VMLINUX)?;
        Btf::parse(&data).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        if data.get(0..2) != Some(&[0x9f, 0xeb]) {
            return Err(BtfError::Magic);
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let section = |off_at: usize| -> Result<&[u8], BtfError> {
            let off = hdr_len + u32_at(data, off_at)? as usize;
            let len = u32_at(data, off_at + 4)? as usize;
            data.get(off..off + len)
                .ok_or(BtfError::Truncated(off + len))
        };
        let type_data = section(8)?.to_vec();
        let strings = section(16)?.to_vec();
        // Type id 0 is `void`; ids count from 1 in the order of the section.
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            kind_flag: false,
            vlen: 0,
            size_or_type: 0,
            extra: 0,
        }];
        let mut at = 0;
        while at < type_data.len() {
            let name_off = u32_at(&type_data, at)?;
            let info = u32_at(&type_data, at + 4)?;
            let size_or_type = u32_at(&type_data, at + 8)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = info & 0xffff;
            let extra_len = match kind {
                1 | 14 | 17 => 4,             // int, var, decl tag
                3 => 12,                      // array
                4 | 5 | 15 | 19 => 12 * vlen, // struct, union, datasec, enum64
                6 | 13 => 8 * vlen,           // enum, func proto
                2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
                k => return Err(BtfError::UnknownKind(k)),
            } as usize;
            types.push(Type {
                name_off,
                kind,
                kind_flag: info >> 31 == 1,
                vlen,
                size_or_type,
                extra: at + 12,
            });
            at += 12 + extra_len;
        }
        Ok(Btf {
            types,
            type_data,
            strings,
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&c| c == 0).unwrap_or(rest.len())]
    }

    fn find(&self, name: &str, kind: u32) -> Option<&Type> {
        self.types
            .iter()
            .find(|t| t.kind == kind && t.name_off != 0 && self.name(t.name_off) == name.as_bytes())
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    fn members(&self, t: &Type) -> impl Iterator<Item = (u32, u32, u32)> + '_ {
        let (extra, vlen) = (t.extra, t.vlen as usize);
        (0..vlen).filter_map(move |i| {
            let at = extra + 12 * i;
            Some((
                u32_at(&self.type_data, at).ok()?,
                u32_at(&self.type_data, at + 4).ok()?,
                u32_at(&self.type_data, at + 8).ok()?,
            ))
        })
    }

    fn member_in(&self, t: &Type, member: &str, depth: u32) -> Option<Member> {
        if depth > 8 {
            return None;
        }
        for (name_off, type_id, offset) in self.members(t) {
            // With kind_flag the offset word packs the bitfield width above a 24-bit offset.
            let (bit_offset, bits) = if t.kind_flag {
                (offset & 0xff_ffff, Some(offset >> 24).filter(|&b| b != 0))
            } else {
                (offset, None)
            };
            if name_off == 0 {
                // An anonymous struct or union: its members belong to the outer one.
                let inner = self.resolve(type_id)?;
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                    if let Some(mut m) = self.member_in(inner, member, depth + 1) {
                        m.bit_offset += bit_offset;
                        return Some(m);
                    }
                }
                continue;
            }
            if self.name(name_off) == member.as_bytes() {
                let size = self.resolve(type_id).and_then(|r| match r.kind {
                    KIND_INT => Some(r.size_or_type),
                    KIND_PTR => Some(8),
                    _ => None,
                });
                return Some(Member {
                    bit_offset,
                    bitfield_bits: bits,
                    size,
                });
            }
        }
        None
    }

    /// Where `member` lies in `struct name` (looking inside anonymous members too).
    pub fn member(&self, name: &str, member: &str) -> Option<Member> {
        let t = self.find(name, KIND_STRUCT)?;
        self.member_in(t, member, 0)
    }

    /// The number of arguments a BTF-enabled tracepoint passes (the `btf_trace_<name>`
    /// typedef's parameters less the leading context pointer).
    pub fn tracepoint_args(&self, tracepoint: &str) -> Option<u32> {
        let td = self.find(&format!("btf_trace_{tracepoint}"), KIND_TYPEDEF)?;
        let ptr = self.resolve(td.size_or_type)?;
        if ptr.kind != KIND_PTR {
            return None;
        }
        let proto = self.resolve(ptr.size_or_type)?;
        (proto.kind == KIND_FUNC_PROTO).then(|| proto.vlen.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_is_not_btf() {
        assert_eq!(Btf::parse(b"hello").err(), Some(BtfError::Magic));
        assert!(matches!(
            Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0]),
            Err(BtfError::Truncated(_))
        ));
    }

    #[test]
    fn reads_this_kernels_layouts() {
        // Every kernel this project runs on has BTF (the probes need it); without it there
        // is nothing to check.
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("no /sys/kernel/btf/vmlinux here");
            return;
        };
        // `skc_family` has sat 16 bytes into `struct sock` for a decade.
        let family = btf.member("sock_common", "skc_family").expect("skc_family");
        assert_eq!(family.bit_offset, 128);
        assert_eq!(family.size, Some(2));
        let sock = btf.member("sock", "__sk_common").expect("__sk_common");
        assert_eq!(sock.bit_offset, 0);
        let proto = btf.member("sock", "sk_protocol").expect("sk_protocol");
        assert!(
            proto.bit_offset > 128 && proto.bit_offset % 8 == 0,
            "{proto:?}"
        );
        // A member inside an anonymous union: `task_struct.__state` is plain, `pid` too.
        assert!(btf.member("task_struct", "pid").is_some());
        // sched_switch passes (preempt, prev, next) and, since 5.18, prev_state.
        let n = btf.tracepoint_args("sched_switch").expect("sched_switch");
        assert!(n == 3 || n == 4, "{n}");
        assert_eq!(btf.tracepoint_args("sched_wakeup"), Some(1));
        assert_eq!(btf.tracepoint_args("no_such_tracepoint"), None);
    }
}
