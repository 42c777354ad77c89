//! The protobuf wire format, just enough to walk an OTLP request: varint, fixed64,
//! length-delimited and fixed32 fields. Groups, field number 0 and any malformed
//! bytes are `Unsure`: the caller hands the message to the Python reference.

/// The native walk cannot vouch for this message: the Python reference decodes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsure;

pub type Walk<T> = Result<T, Unsure>;

/// One field's value as it stands on the wire.
#[derive(Debug, Clone, Copy)]
pub enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32,
}

impl<'a> Field<'a> {
    /// A length-delimited field's bytes; another wire type for a field read as bytes is `Unsure`.
    #[inline]
    pub fn bytes(self) -> Walk<&'a [u8]> {
        match self {
            Field::Bytes(bytes) => Ok(bytes),
            _ => Err(Unsure),
        }
    }

    #[inline]
    pub fn fixed64(self) -> Walk<u64> {
        match self {
            Field::Fixed64(value) => Ok(value),
            _ => Err(Unsure),
        }
    }

    #[inline]
    pub fn varint(self) -> Walk<u64> {
        match self {
            Field::Varint(value) => Ok(value),
            _ => Err(Unsure),
        }
    }
}

/// The messages the decoding walk descends into itself, from the request down (`lib.rs`):
/// where it reads the fields of one, `Source` is told which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Request,
    ResourceSpans,
    ScopeSpans,
    Span,
    KeyValue,
}

/// Where the decoding walk reads a message's fields from: the bytes as they stand (`Plain`), or
/// checked on the way as upb checks them (`valid::Checking`, the whole-message check in the same
/// walk). Either yields the same fields of the bytes upb accepts.
pub trait Source: Copy {
    type Fields<'a>: Iterator<Item = Walk<(u32, Field<'a>)>>;

    fn fields<'a>(self, message: &'a [u8], level: Level) -> Self::Fields<'a>;

    /// An attribute entry's key the walk did not find in its table (a key there is UTF-8, a
    /// Python `str`'s), or one a later key of the entry replaced: checked as a string field.
    fn key(self, key: &[u8]) -> Walk<()>;
}

/// The fields as they stand, nothing checked: for bytes upb accepts.
#[derive(Debug, Clone, Copy)]
pub struct Plain;

impl Source for Plain {
    type Fields<'a> = Fields<'a>;

    #[inline]
    fn fields<'a>(self, message: &'a [u8], _level: Level) -> Fields<'a> {
        Fields::of(message)
    }

    #[inline]
    fn key(self, _key: &[u8]) -> Walk<()> {
        Ok(())
    }
}

/// The fields of one message, in wire order.
pub struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    #[inline]
    pub fn of(message: &'a [u8]) -> Self {
        Fields { rest: message }
    }

    #[inline]
    fn varint(&mut self) -> Walk<u64> {
        if let Some(&byte) = self.rest.first() {
            if byte < 0x80 {
                // one byte: every tag and length of a short field
                self.rest = &self.rest[1..];
                return Ok(u64::from(byte));
            }
        }
        let mut value = 0u64;
        for (at, byte) in self.rest.iter().take(10).enumerate() {
            value |= u64::from(byte & 0x7f) << (7 * at);
            if byte & 0x80 == 0 {
                self.rest = &self.rest[at + 1..];
                return Ok(value);
            }
        }
        Err(Unsure)
    }

    #[inline]
    fn take(&mut self, count: usize) -> Walk<&'a [u8]> {
        take(&mut self.rest, count)
    }
}

/// The next `count` bytes of `rest`, which then starts past them; `Unsure` if it is shorter.
#[inline]
pub fn take<'a>(rest: &mut &'a [u8], count: usize) -> Walk<&'a [u8]> {
    if count > rest.len() {
        return Err(Unsure);
    }
    let (taken, after) = rest.split_at(count);
    *rest = after;
    Ok(taken)
}

impl<'a> Iterator for Fields<'a> {
    type Item = Walk<(u32, Field<'a>)>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        Some(self.field())
    }
}

impl<'a> Fields<'a> {
    #[inline]
    fn field(&mut self) -> Walk<(u32, Field<'a>)> {
        let tag = self.varint()?;
        let number = u32::try_from(tag >> 3).map_err(|_| Unsure)?;
        if number == 0 {
            return Err(Unsure);
        }
        let field = match tag & 7 {
            0 => Field::Varint(self.varint()?),
            1 => Field::Fixed64(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| Unsure)?)),
            2 => {
                let length = usize::try_from(self.varint()?).map_err(|_| Unsure)?;
                Field::Bytes(self.take(length)?)
            }
            5 => {
                self.take(4)?;
                Field::Fixed32
            }
            _ => return Err(Unsure),
        };
        Ok((number, field))
    }
}
