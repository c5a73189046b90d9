/// What filesystem a partition holds, read from its superblock magic, so an error can say
/// "partition 1 is vfat, not ext4" and a label can find the root partition.
public struct FilesystemProbe: Sendable, Equatable {
    public enum Kind: String, Sendable, Equatable {
        case ext2, ext3, ext4, vfat, exfat, ntfs, btrfs, xfs, squashfs, swap, unknown
        public var isExt: Bool { self == .ext2 || self == .ext3 || self == .ext4 }
    }

    public var kind: Kind
    public var label: String

    /// Bytes needed from the partition's start to probe every kind listed above.
    public static let probeLength = 0x10000 + 0x1000

    /// Reads the start of a partition (`bytes` may be shorter than `probeLength`).
    public init(partitionStart bytes: [UInt8]) {
        func has(_ text: String, at offset: Int) -> Bool {
            let t = Array(text.utf8)
            return bytes.count >= offset + t.count && Array(bytes[offset..<offset + t.count]) == t
        }
        func text(_ offset: Int, _ length: Int) -> String {
            guard bytes.count >= offset + length else { return "" }
            let raw = bytes[offset..<offset + length].prefix { $0 != 0 }
            return String(decoding: raw, as: UTF8.self).trimmingCharacters()
        }
        // ext2/3/4: superblock at 1024, magic 0xEF53 at +56, volume name at +120.
        if bytes.count >= 1024 + 136, le16(bytes, 1024 + 56) == 0xEF53 {
            let compat = le32(bytes, 1024 + 92), incompat = le32(bytes, 1024 + 96)
            let ext4Incompat: UInt32 = 0x40 | 0x80 | 0x200 | 0x2000 | 0x8000 // extents, 64bit, flex_bg, …
            kind = incompat & ext4Incompat != 0 ? .ext4 : (compat & 0x4 != 0 ? .ext3 : .ext2)
            label = text(1024 + 120, 16)
            return
        }
        if has("EXFAT   ", at: 3) { kind = .exfat; label = ""; return }
        if has("NTFS    ", at: 3) { kind = .ntfs; label = ""; return }
        // FAT: boot sector signature, and the type string of FAT12/16 (at 54) or FAT32 (at 82);
        // the boot sector's volume label sits just before it.
        if bytes.count >= 512, bytes[510] == 0x55, bytes[511] == 0xAA {
            if has("FAT32   ", at: 82) { kind = .vfat; label = Self.fatLabel(text(71, 11)); return }
            if has("FAT1", at: 54) { kind = .vfat; label = Self.fatLabel(text(43, 11)); return }
        }
        if has("XFSB", at: 0) { kind = .xfs; label = text(108, 12); return }
        if has("hsqs", at: 0) { kind = .squashfs; label = ""; return }
        if has("_BHRfS_M", at: 0x10040) { kind = .btrfs; label = text(0x1012B, 256); return }
        if has("SWAPSPACE2", at: 4096 - 10) { kind = .swap; label = text(1024 + 28, 16); return }
        kind = .unknown
        label = ""
    }

    /// mkfs.vfat writes "NO NAME" when no label was given.
    static func fatLabel(_ raw: String) -> String { raw == "NO NAME" ? "" : raw }
}
