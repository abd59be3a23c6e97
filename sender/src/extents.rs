//! A file's data and holes, read in the order a whole body travels: data in chunks of at most
//! [`CHUNK`], the holes between a sparse file's data extents as lengths.

use crate::transfer::{TransferError, CHUNK};
use ferry_protocol::RelPath;
use std::io::{Read, Seek};
use std::os::fd::AsRawFd;

/// A piece of a whole body, as it travels.
pub enum Piece {
    /// Bytes of the file, at most [`CHUNK`] of them.
    Data(Vec<u8>),
    /// A hole of this many bytes.
    Hole(u64),
}

/// Reads `file` from `from` up to `until` (or its end) as a whole body travels, each piece
/// to `each`: data in chunks of at most [`CHUNK`] and, when `sparse`, the holes between its
/// data extents as holes (so the resumed prefix is read as it was sent). Returns where it
/// stopped; a file grown past `size` has changed.
pub fn walk(
    file: &mut std::fs::File,
    from: u64,
    until: u64,
    size: u64,
    sparse: bool,
    path: &RelPath,
    each: &mut dyn FnMut(Piece) -> Result<(), TransferError>,
) -> Result<u64, TransferError> {
    let read_err = |source| TransferError::Read {
        path: path.clone(),
        source,
    };
    let mut total = from;
    // Sparse: where the data extent being read ends; at it, skip to the next data, the
    // stretch before it being a hole. Dense files read straight through.
    let mut extent_end = if sparse { from } else { u64::MAX };
    while total < until {
        if total >= extent_end && total < size {
            let data = seek_data(file, total)
                .map_err(read_err)?
                .min(size)
                .min(until);
            if data > total {
                each(Piece::Hole(data - total))?;
                total = data;
                if total >= until {
                    break;
                }
            }
            extent_end = seek_hole(file, total).map_err(read_err)?;
            file.seek(std::io::SeekFrom::Start(total))
                .map_err(read_err)?;
            if total >= size {
                // The file ends in a hole; a read tells whether it grew meanwhile.
                extent_end = u64::MAX;
            }
        }
        // One byte past the size: a read that gets it tells the file grew.
        let want = CHUNK
            .min(size.saturating_sub(total) as usize + 1)
            .min(extent_end.saturating_sub(total).max(1) as usize)
            .min(usize::try_from(until - total).unwrap_or(usize::MAX));
        let mut chunk = Vec::with_capacity(want);
        let n = read_into(file, &mut chunk).map_err(read_err)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > size {
            return Err(TransferError::Changed(path.clone()));
        }
        each(Piece::Data(chunk))?;
        // A regular file reads short only at its end: a small file takes one read, not a
        // second and third to find the end. (A short read anywhere else leaves `total`
        // short of the size, which the caller takes for a file that changed.)
        if n < want {
            break;
        }
    }
    Ok(total)
}

/// The first offset at or after `from` that holds data; the file's length if none does.
fn seek_data(f: &std::fs::File, from: u64) -> std::io::Result<u64> {
    seek(f, from, libc::SEEK_DATA)
}

/// The first offset at or after `from` in a hole (the file's length counts as one).
fn seek_hole(f: &std::fs::File, from: u64) -> std::io::Result<u64> {
    seek(f, from, libc::SEEK_HOLE)
}

fn seek(f: &std::fs::File, from: u64, whence: libc::c_int) -> std::io::Result<u64> {
    // SAFETY: a valid descriptor; lseek only moves its offset.
    let r = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, whence) };
    if r >= 0 {
        return Ok(r as u64);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        // Past the last data: the rest is a hole.
        Some(libc::ENXIO) => Ok(f.metadata()?.len().max(from)),
        _ => Err(e),
    }
}

/// One read into the spare capacity of `buf`, not zeroed first (again if interrupted); the
/// bytes read are added to its length. The count read, which for a regular file is
/// short only at its end.
fn read_into(f: &std::fs::File, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let spare = buf.spare_capacity_mut();
    loop {
        // SAFETY: `read` writes at most `spare.len()` bytes into `spare`, which `buf` owns
        // and does not otherwise use until the call returns.
        let n = unsafe { libc::read(f.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
        if n >= 0 {
            let n = n as usize;
            // SAFETY: the kernel initialised the first `n` bytes of the spare capacity.
            unsafe { buf.set_len(buf.len() + n) };
            return Ok(n);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reads until `buf` is full or the file ends; the count read.
pub fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(bytes: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f.rewind().unwrap();
        f
    }

    /// Walks `f` as a file of `size` bytes: what it read, and the total or the error.
    fn walked(f: &mut std::fs::File, size: u64) -> (Vec<u8>, Result<u64, TransferError>) {
        let mut got = Vec::new();
        let mut each = |p: Piece| {
            match p {
                Piece::Data(d) => got.extend_from_slice(&d),
                Piece::Hole(n) => got.resize(got.len() + n as usize, 0),
            }
            Ok(())
        };
        let r = walk(f, 0, u64::MAX, size, false, &RelPath::from("f"), &mut each);
        (got, r)
    }

    /// A file read as the size its `fstat` gave: whole at any length (a small one in one
    /// read, a large one in chunks); one that grew since is a change (the byte past the
    /// size is asked for); one that shrank ends short of the size, which the caller takes
    /// for a change.
    #[test]
    fn a_file_is_read_to_its_size_and_a_change_of_length_shows() {
        for len in [
            0,
            1,
            4095,
            4096,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            3 * CHUNK + 17,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let (got, total) = walked(&mut file_of(&data), len as u64);
            assert_eq!(total.unwrap(), len as u64, "len {len}");
            assert!(got == data, "len {len}: the bytes differ");
        }
        let data = vec![9u8; 5000];
        let (_, grew) = walked(&mut file_of(&data), 4000);
        assert!(matches!(grew, Err(TransferError::Changed(_))), "grew");
        let (got, shrank) = walked(&mut file_of(&data), 6000);
        assert_eq!(shrank.unwrap(), 5000);
        assert_eq!(got.len(), 5000);
    }
}
