//! The fixed-VHD footer: what Azure requires of a VHD (the last 512 bytes start
//! with `conectix`, disk type fixed, a valid checksum, a size that is a whole
//! number of MiB), and how to build one for test and demo images.

/// Length of the footer at the end of the file.
pub(crate) const FOOTER_LEN: u64 = 512;
const MIB: u64 = 1024 * 1024;
/// Largest page blob Azure allows.
pub(crate) const MAX_BLOB_BYTES: u64 = 8 * 1024 * 1024 * MIB;

/// Why a blob is not a VHD Batch can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VhdError {
    /// Too short to hold a footer.
    #[error(
        "the blob is {0} bytes, too short to be a VHD (a fixed VHD ends in a 512-byte footer)"
    )]
    TooShort(u64),
    /// Larger than Azure's page-blob limit.
    #[error("the blob is {0} bytes, larger than the 8 TiB page-blob limit")]
    TooLarge(u64),
    /// No `conectix` cookie.
    #[error("the last 512 bytes are not a VHD footer (no \"conectix\" cookie); convert the disk to a fixed VHD")]
    NoCookie,
    /// Dynamic or differencing.
    #[error("the VHD's disk type is {0} ({1}); Azure needs a fixed VHD: convert it with `qemu-img convert -O vpc -o subformat=fixed,force_size`")]
    NotFixed(u32, &'static str),
    /// Checksum mismatch.
    #[error("the VHD footer's checksum is wrong (stored {stored:#010x}, computed {computed:#010x}); the file is damaged")]
    BadChecksum {
        /// In the footer.
        stored: u32,
        /// Over the footer.
        computed: u32,
    },
    /// Size not aligned.
    #[error("the VHD's virtual size is {0} bytes, not a whole number of MiB; resize it to a multiple of 1 MiB")]
    Unaligned(u64),
    /// Footer size disagrees with the blob.
    #[error(
        "the footer says the disk holds {footer} bytes but the blob holds {data} before the footer"
    )]
    SizeMismatch {
        /// From the footer.
        footer: u64,
        /// From the blob length.
        data: u64,
    },
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn checksum(footer: &[u8]) -> u32 {
    let sum: u32 = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |acc, (_, b)| acc.wrapping_add(*b as u32));
    !sum
}

/// Checks the blob length alone, before reading anything.
pub(crate) fn check_length(blob_len: u64) -> Result<(), VhdError> {
    if blob_len < FOOTER_LEN + MIB {
        return Err(VhdError::TooShort(blob_len));
    }
    if blob_len > MAX_BLOB_BYTES {
        return Err(VhdError::TooLarge(blob_len));
    }
    let data = blob_len - FOOTER_LEN;
    if !data.is_multiple_of(MIB) {
        return Err(VhdError::Unaligned(data));
    }
    Ok(())
}

/// Checks a footer (the last 512 bytes) against the blob length.
pub fn check_footer(footer: &[u8], blob_len: u64) -> Result<(), VhdError> {
    check_length(blob_len)?;
    if footer.len() != FOOTER_LEN as usize || &footer[0..8] != b"conectix" {
        return Err(VhdError::NoCookie);
    }
    let disk_type = be32(footer, 60);
    if disk_type != 2 {
        let name = match disk_type {
            3 => "dynamic",
            4 => "differencing",
            _ => "unknown",
        };
        return Err(VhdError::NotFixed(disk_type, name));
    }
    let stored = be32(footer, 64);
    let computed = checksum(footer);
    if stored != computed {
        return Err(VhdError::BadChecksum { stored, computed });
    }
    let current = be64(footer, 48);
    let data = blob_len - FOOTER_LEN;
    if current != data {
        return Err(VhdError::SizeMismatch {
            footer: current,
            data,
        });
    }
    Ok(())
}

/// CHS geometry of the VHD specification for a disk of `size` bytes.
fn geometry(size: u64) -> (u16, u8, u8) {
    let mut sectors = (size / 512).min(65535 * 16 * 255);
    let (mut spt, mut heads, mut cth);
    if sectors >= 65535 * 16 * 63 {
        spt = 255u64;
        heads = 16u64;
        cth = sectors / spt;
    } else {
        spt = 17;
        cth = sectors / spt;
        heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            cth = sectors / spt;
        }
        if cth >= heads * 1024 {
            spt = 63;
            heads = 16;
            cth = sectors / spt;
        }
    }
    sectors = cth / heads;
    (sectors.min(65535) as u16, heads as u8, spt as u8)
}

/// A valid footer of a fixed VHD whose data part is `size` bytes.
pub(crate) fn fixed_footer(size: u64, unique_id: [u8; 16]) -> [u8; 512] {
    let mut f = [0u8; 512];
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
    f[28..32].copy_from_slice(b"vhdr");
    f[32..36].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&size.to_be_bytes());
    f[48..56].copy_from_slice(&size.to_be_bytes());
    let (c, h, s) = geometry(size);
    f[56..58].copy_from_slice(&c.to_be_bytes());
    f[58] = h;
    f[59] = s;
    f[60..64].copy_from_slice(&2u32.to_be_bytes());
    f[68..84].copy_from_slice(&unique_id);
    let sum = checksum(&f);
    f[64..68].copy_from_slice(&sum.to_be_bytes());
    f
}

/// A whole fixed VHD image of `mib` MiB: a recognisable pattern in the first
/// `data_mib` MiB (the rest zero, so it stays sparse), then the footer.
pub fn sample_image(mib: u64, data_mib: u64, seed: u8) -> Vec<u8> {
    let size = mib * MIB;
    let mut image = vec![0u8; (size + FOOTER_LEN) as usize];
    let filled = (data_mib.min(mib) * MIB) as usize;
    let mut x: u32 = 0x9E37_79B9 ^ seed as u32;
    for chunk in image[..filled].chunks_mut(4) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    let footer = fixed_footer(size, [seed; 16]);
    image[size as usize..].copy_from_slice(&footer);
    image
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_footer_checks_out() {
        let img = sample_image(4, 1, 7);
        let len = img.len() as u64;
        check_footer(&img[img.len() - 512..], len).unwrap();
    }

    #[test]
    fn damage_is_named() {
        let img = sample_image(2, 1, 1);
        let len = img.len() as u64;
        let mut f = img[img.len() - 512..].to_vec();
        f[100] ^= 1;
        assert!(matches!(
            check_footer(&f, len),
            Err(VhdError::BadChecksum { .. })
        ));
        let mut f = img[img.len() - 512..].to_vec();
        f[0] = b'x';
        assert_eq!(check_footer(&f, len), Err(VhdError::NoCookie));
        let mut f = img[img.len() - 512..].to_vec();
        f[60..64].copy_from_slice(&3u32.to_be_bytes());
        let sum = checksum(&f);
        f[64..68].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(check_footer(&f, len), Err(VhdError::NotFixed(3, "dynamic")));
        let f = img[img.len() - 512..].to_vec();
        assert!(matches!(
            check_footer(&f, len + MIB),
            Err(VhdError::SizeMismatch { .. })
        ));
        assert_eq!(
            check_length(MIB + 512 + 512),
            Err(VhdError::Unaligned(MIB + 512))
        );
        assert_eq!(check_length(100), Err(VhdError::TooShort(100)));
        assert!(matches!(
            check_length(MAX_BLOB_BYTES + 512 + MIB),
            Err(VhdError::TooLarge(_))
        ));
    }

    #[test]
    fn geometry_follows_the_spec_examples() {
        // 127 GiB: 266338304 sectors, over the 63-sector range: 255 sectors, 16 heads.
        assert_eq!(geometry(127 * 1024 * MIB), (65278, 16, 255));
        let (c, h, s) = geometry(4 * MIB);
        assert!(c as u64 * h as u64 * s as u64 * 512 <= 4 * MIB);
    }

    #[test]
    fn the_limits_are_exact() {
        assert_eq!(MAX_BLOB_BYTES, 8_796_093_022_208, "8 TiB");
        assert_eq!(check_length(FOOTER_LEN + MIB), Ok(()));
        assert_eq!(
            check_length(FOOTER_LEN + MIB - 1),
            Err(VhdError::TooShort(MIB + 511))
        );
        // The largest blob whose data is whole MiB, and the limit itself (not whole MiB).
        assert_eq!(check_length(MAX_BLOB_BYTES - MIB + FOOTER_LEN), Ok(()));
        assert_eq!(
            check_length(MAX_BLOB_BYTES),
            Err(VhdError::Unaligned(MAX_BLOB_BYTES - FOOTER_LEN))
        );
        assert_eq!(
            check_length(MAX_BLOB_BYTES + FOOTER_LEN),
            Err(VhdError::TooLarge(MAX_BLOB_BYTES + FOOTER_LEN))
        );
    }

    #[test]
    fn the_checksum_is_the_ones_complement_of_the_byte_sum_without_itself() {
        assert_eq!(checksum(&[0u8; 512]), 0xFFFF_FFFF);
        let mut f = [0u8; 512];
        f[0..8].copy_from_slice(b"conectix");
        // 'c'+'o'+'n'+'e'+'c'+'t'+'i'+'x' = 861.
        assert_eq!(checksum(&f), !861u32);
        f[64..68].copy_from_slice(&[0xFF; 4]);
        assert_eq!(checksum(&f), !861u32, "the checksum field is left out");
        let footer = fixed_footer(MIB, [0; 16]);
        assert_eq!(be32(&footer, 64), checksum(&footer));
    }

    #[test]
    fn differencing_disks_are_named() {
        let img = sample_image(2, 1, 1);
        let len = img.len() as u64;
        let mut f = img[img.len() - 512..].to_vec();
        f[60..64].copy_from_slice(&4u32.to_be_bytes());
        let sum = checksum(&f);
        f[64..68].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(
            check_footer(&f, len),
            Err(VhdError::NotFixed(4, "differencing"))
        );
        f[60..64].copy_from_slice(&9u32.to_be_bytes());
        let sum = checksum(&f);
        f[64..68].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(check_footer(&f, len), Err(VhdError::NotFixed(9, "unknown")));
    }

    /// Every branch of the specification's CHS algorithm (VHD format spec,
    /// appendix "CHS calculation"): 17 sectors with at least 4 heads (exactly
    /// 16 heads still fits), 31 when the heads would pass 16 or the cylinders fill, 63, and 255 for large disks.
    #[test]
    fn geometry_takes_every_branch_of_the_spec() {
        for (size, chs) in [
            (4 * MIB, (120, 4, 17)),
            (20 * MIB, (602, 4, 17)),
            (100 * MIB, (1003, 12, 17)),
            (272_000 * 512, (1000, 16, 17)),
            (87_040 * 512, (175, 16, 31)),
            (200 * MIB, (825, 16, 31)),
            (1024 * MIB, (2080, 16, 63)),
            (65_535 * 16 * 63 * 512 - 512, (65_534, 16, 63)),
            (65_535 * 16 * 63 * 512, (16_191, 16, 255)),
            (2 << 40, (65_535, 16, 255)),
        ] {
            assert_eq!(geometry(size), chs, "{size} bytes");
        }
        let footer = fixed_footer(1024 * MIB, [0; 16]);
        assert_eq!(
            (
                u16::from_be_bytes([footer[56], footer[57]]),
                footer[58],
                footer[59]
            ),
            (2080, 16, 63)
        );
    }

    /// Sample images: the given size, a xorshift32 pattern (Marsaglia) in the
    /// data part that differs by seed, zeros after it, and a valid footer.
    #[test]
    fn sample_images_are_patterned_sparse_and_valid() {
        let img = sample_image(3, 1, 7);
        assert_eq!(img.len() as u64, 3 * MIB + FOOTER_LEN);
        // x0 = 0x9E3779B9 ^ 7; x ^= x << 13; x ^= x >> 17; x ^= x << 5.
        assert_eq!(img[0..4], 0x5110_a6fe_u32.to_le_bytes());
        assert_eq!(img[4..8], 0xfc27_c739_u32.to_le_bytes());
        let words: std::collections::HashSet<&[u8]> = img[..MIB as usize].chunks(4).collect();
        assert!(words.len() > 250_000, "{} distinct words", words.len());
        assert!(img[MIB as usize..3 * MIB as usize].iter().all(|b| *b == 0));
        assert_ne!(img[..MIB as usize], sample_image(3, 1, 8)[..MIB as usize]);
        check_footer(&img[3 * MIB as usize..], img.len() as u64).unwrap();
    }
}
