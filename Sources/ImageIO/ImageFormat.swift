/// The container of an image file, told by its first bytes — never by its name, because
/// "image.img" that is really xz, or "image.gz" that is raw, are both common on a bench.
///
/// raw, gzip, xz and zstd have native decoders (measured faster than going through
/// libarchive: see README "Formats"); bzip2, lz4, lzop, zip and tar are read through
/// libarchive, as Raspberry Pi Imager reads them. A tar may itself be compressed with any of
/// the compressors (`.tar.gz`, `.tar.xz`, …): `ImageSource.archiveFilter` names it.
public enum ImageFormat: String, Sendable, CaseIterable {
    case raw, gzip, xz, zstd
    case bzip2, lz4, lzop, zip, tar

    /// The compressor or container named by the first bytes alone (a compressed tar shows up
    /// here as its compressor; `ImageSource` looks inside to tell).
    public init(magic: some Collection<UInt8>) {
        let b = Array(magic.prefix(512))
        func starts(_ m: [UInt8], at offset: Int = 0) -> Bool {
            b.count >= offset + m.count && Array(b[offset..<(offset + m.count)]) == m
        }
        if starts([0x1F, 0x8B]) { self = .gzip }
        else if starts([0xFD, 0x37, 0x7A, 0x58, 0x5A, 0x00]) { self = .xz }
        else if starts([0x28, 0xB5, 0x2F, 0xFD]) { self = .zstd }
        // A skippable frame first (pzstd writes one; zstd and lz4 share its magic, 0x184D2A5?):
        // the format is that of the frame after it.
        else if let next = Self.afterSkippableFrame(b), starts([0x28, 0xB5, 0x2F, 0xFD], at: next) { self = .zstd }
        else if let next = Self.afterSkippableFrame(b), starts([0x04, 0x22, 0x4D, 0x18], at: next) { self = .lz4 }
        // "BZh" and a block size digit 1–9.
        else if starts(Array("BZh".utf8)), b.count > 3, (0x31...0x39).contains(b[3]) { self = .bzip2 }
        // The lz4 frame format, and the legacy format lz4 -l writes.
        else if starts([0x04, 0x22, 0x4D, 0x18]) || starts([0x02, 0x21, 0x4C, 0x18]) { self = .lz4 }
        else if starts([0x89, 0x4C, 0x5A, 0x4F, 0x00, 0x0D, 0x0A, 0x1A, 0x0A]) { self = .lzop }
        // A local file header, or the end record of an empty zip.
        else if starts([0x50, 0x4B, 0x03, 0x04]) || starts([0x50, 0x4B, 0x05, 0x06]) { self = .zip }
        // POSIX ustar and GNU tar both put "ustar" at byte 257.
        else if starts(Array("ustar".utf8), at: 257) { self = .tar }
        else { self = .raw }
    }

    /// Where the frame after a leading skippable frame (zstd's and lz4's) begins; nil when
    /// `b` does not start with one.
    static func afterSkippableFrame(_ b: [UInt8]) -> Int? {
        guard b.count >= 8, (0x50...0x5F).contains(b[0]), b[1] == 0x2A, b[2] == 0x4D, b[3] == 0x18 else { return nil }
        return 8 + (Int(b[4]) | Int(b[5]) << 8 | Int(b[6]) << 16 | Int(b[7]) << 24)
    }

    /// Read by a decoder of our own (zlib, liblzma, libzstd) rather than libarchive.
    var isNative: Bool { self == .raw || self == .gzip || self == .xz || self == .zstd }

    /// A stream compressor (as opposed to an archive, or no container at all).
    var isCompressor: Bool { [.gzip, .xz, .zstd, .bzip2, .lz4, .lzop].contains(self) }
}

/// Containers and disk formats that provision does not write, found by magic bytes so that
/// they are refused before the first byte reaches a card — written raw, they give a card
/// that does not boot and a `done` that lies. Each says what to do instead.
public struct UnsupportedFormat: Sendable, Equatable {
    public let name: String
    public let advice: String

    /// `head`: the file's first bytes (at least 512 where the file has them); `tail`: its
    /// last 512 (Apple's disk images and fixed VHDs are marked at the end).
    public static func detect(head: [UInt8], tail: [UInt8]) -> UnsupportedFormat? {
        func starts(_ m: [UInt8], at offset: Int = 0) -> Bool {
            head.count >= offset + m.count && Array(head[offset..<(offset + m.count)]) == m
        }
        func starts(_ text: String, at offset: Int = 0) -> Bool { starts(Array(text.utf8), at: offset) }
        let extract = "extract the disk image from it (and compress it with xz or zstd if you like), then write that"
        let convert = "convert it to a raw image first, e.g. `qemu-img convert -O raw IN OUT.img`"
        if starts([0x37, 0x7A, 0xBC, 0xAF, 0x27, 0x1C]) { return .init(name: "7-Zip archive", advice: extract) }
        if starts("Rar!\u{1A}\u{07}") { return .init(name: "RAR archive", advice: extract) }
        if starts([0x51, 0x46, 0x49, 0xFB]) { return .init(name: "QEMU qcow2 disk image", advice: convert) }  // "QFI\xFB"
        if starts("KDMV") || starts("# Disk DescriptorFile") { return .init(name: "VMware VMDK disk image", advice: convert) }
        if starts("vhdxfile") { return .init(name: "Hyper-V VHDX disk image", advice: convert) }
        if starts("conectix") { return .init(name: "VHD disk image (dynamic)", advice: convert) }
        if starts([0x7F, 0x10, 0xDA, 0xBE], at: 64) { return .init(name: "VirtualBox VDI disk image", advice: convert) }
        if starts([0x3A, 0xFF, 0x26, 0xED]) {
            return .init(name: "Android sparse image", advice: "turn it into a raw image with `simg2img IN OUT.img`, then write that")
        }
        if starts("LZIP") { return .init(name: "lzip-compressed file", advice: "decompress it with `lzip -d` (or recompress with xz or zstd), then write that") }
        if starts([0x1F, 0x9D]) { return .init(name: "compress(1) .Z file", advice: "decompress it with `uncompress` (or recompress with xz or zstd), then write that") }
        if starts("070701") || starts("070702") || starts("070707") || starts([0xC7, 0x71]) {
            return .init(name: "cpio archive", advice: extract)
        }
        if starts("xar!") { return .init(name: "xar archive", advice: extract) }
        if starts("MSCF") { return .init(name: "Microsoft cabinet archive", advice: extract) }
        if starts("!<arch>\n") { return .init(name: "ar archive (a .deb?)", advice: extract) }
        // The "koly" trailer of an Apple disk image. (A fixed VHD, a raw disk with a footer, is
        // written raw: the footer lands past the partitions.)
        if tail.count == 512, Array(tail[0..<4]) == Array("koly".utf8) {
            return .init(name: "Apple disk image (.dmg)", advice: "convert it to a raw image first, e.g. `dmg2img IN OUT.img`")
        }
        return nil
    }
}
