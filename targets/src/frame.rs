//! The serial frame of one answer, built without allocation (`heapless`), for a
//! microcontroller on the robot's serial line (UART, USB CDC) to parse.
//!
//! ```text
//! offset  size  field
//! 0       1     0x7E                      start of frame
//! 1       1     kind                      bits 0-6: 1 answer, 2 error; bit 7: the text was truncated
//! 2       2     sequence number, u16 LE   counts frames since start, wraps
//! 4       2     text length N, u16 LE     N <= MAX_TEXT
//! 6       N     UTF-8 text                cut at a character boundary when longer than MAX_TEXT
//! 6+N     2     CRC-16/CCITT-FALSE, LE    over bytes 1 .. 6+N (kind through text)
//! ```
//!
//! No byte stuffing: a reader that loses sync scans for the next 0x7E and accepts a frame only
//! when its length is in range and its CRC matches ([`Decoder`] does exactly that).

use crc::{Crc, CRC_16_IBM_3740};

/// Start-of-frame byte.
pub const START: u8 = 0x7E;
/// Longest text a frame carries (bytes).
pub const MAX_TEXT: usize = 240;
/// Bytes around the text: start, kind, sequence, length, CRC.
pub const OVERHEAD: usize = 8;
/// Largest frame.
pub const MAX_FRAME: usize = MAX_TEXT + OVERHEAD;

/// CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF; catalogued as CRC-16/IBM-3740).
const CCITT: Crc<u16> = Crc::<u16>::new(&CRC_16_IBM_3740);

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Answer = 1,
    Error = 2,
}

/// A frame's bytes, fixed capacity.
pub type FrameBytes = heapless::Vec<u8, MAX_FRAME>;

/// Builds the frame of `text` (cut at a character boundary to [`MAX_TEXT`] bytes, flagged).
pub fn encode(kind: Kind, seq: u16, text: &str) -> FrameBytes {
    let mut n = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    let truncated = n < text.len();
    let mut f = FrameBytes::new();
    // capacity is MAX_FRAME and the parts below add up to at most that: the pushes cannot fail
    let _ = f.push(START);
    let _ = f.push(kind as u8 | if truncated { 0x80 } else { 0 });
    let _ = f.extend_from_slice(&seq.to_le_bytes());
    let _ = f.extend_from_slice(&(n as u16).to_le_bytes());
    let _ = f.extend_from_slice(&text.as_bytes()[..n]);
    let crc = CCITT.checksum(&f[1..]);
    let _ = f.extend_from_slice(&crc.to_le_bytes());
    f
}

/// A frame read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub truncated: bool,
    pub seq: u16,
    pub text: heapless::String<MAX_TEXT>,
}

/// Reads frames from a byte stream, one byte at a time (what a microcontroller's UART
/// interrupt does), resynchronising on corrupt or partial frames.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: heapless::Vec<u8, MAX_FRAME>,
}

impl Decoder {
    /// Feeds one byte; returns a frame when one is complete and valid.
    pub fn push(&mut self, byte: u8) -> Option<Frame> {
        if self.buf.is_empty() && byte != START {
            return None;
        }
        if self.buf.push(byte).is_err() {
            self.resync();
            return None;
        }
        if self.buf.len() < 6 {
            return None;
        }
        let n = u16::from_le_bytes([self.buf[4], self.buf[5]]) as usize;
        if n > MAX_TEXT {
            self.resync();
            return None;
        }
        if self.buf.len() < n + OVERHEAD {
            return None;
        }
        let body = &self.buf[1..6 + n];
        let crc = u16::from_le_bytes([self.buf[6 + n], self.buf[7 + n]]);
        let frame = if CCITT.checksum(body) == crc {
            core::str::from_utf8(&self.buf[6..6 + n]).ok().and_then(|t| {
                let mut text = heapless::String::new();
                text.push_str(t).ok()?;
                Some(Frame {
                    kind: self.buf[1] & 0x7F,
                    truncated: self.buf[1] & 0x80 != 0,
                    seq: u16::from_le_bytes([self.buf[2], self.buf[3]]),
                    text,
                })
            })
        } else {
            None
        };
        match frame {
            Some(f) => {
                self.buf.clear();
                Some(f)
            }
            None => {
                self.resync();
                None
            }
        }
    }

    /// Drops the buffered bytes up to the next start byte after the first.
    fn resync(&mut self) {
        let next = self.buf.iter().skip(1).position(|&b| b == START).map(|i| i + 1);
        let rest: heapless::Vec<u8, MAX_FRAME> = match next {
            Some(i) => self.buf[i..].iter().copied().collect(),
            None => heapless::Vec::new(),
        };
        self.buf = rest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8]) -> Vec<Frame> {
        let mut d = Decoder::default();
        bytes.iter().filter_map(|&b| d.push(b)).collect()
    }

    #[test]
    fn frames_round_trip_and_the_crc_is_ccitt_false() {
        // the catalogue check value of CRC-16/CCITT-FALSE
        assert_eq!(CCITT.checksum(b"123456789"), 0x29B1);
        let f = encode(Kind::Answer, 7, "49");
        assert_eq!(&f[..6], &[0x7E, 1, 7, 0, 2, 0]);
        assert_eq!(f.len(), 2 + OVERHEAD);
        let got = decode_all(&f);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].kind, got[0].seq, got[0].text.as_str(), got[0].truncated), (1, 7, "49", false));
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary_and_flagged() {
        let text = "é".repeat(200); // 400 bytes
        let f = encode(Kind::Answer, 1, &text);
        assert_eq!(f.len(), MAX_FRAME);
        let got = decode_all(&f);
        assert!(got[0].truncated);
        assert_eq!(got[0].text.len(), MAX_TEXT);
        assert!(text.starts_with(got[0].text.as_str()));
    }

    #[test]
    fn the_decoder_skips_noise_and_corrupt_frames() {
        let mut stream = vec![0x00, 0x7E, 0x13, 0xFF];
        let mut bad = encode(Kind::Answer, 1, "lost");
        bad[7] ^= 0x01;
        stream.extend_from_slice(&bad);
        stream.extend_from_slice(&encode(Kind::Error, 2, "no image"));
        stream.extend_from_slice(&encode(Kind::Answer, 3, "a 7E \u{7e} byte"));
        let got = decode_all(&stream);
        let texts: Vec<&str> = got.iter().map(|f| f.text.as_str()).collect();
        assert_eq!(texts, ["no image", "a 7E ~ byte"]);
        assert_eq!(got[0].kind, Kind::Error as u8);
    }
}
