/// The container of an image file, told by its first bytes — never by its name, because
/// "image.img" that is really xz, or "image.gz" that is raw, are both common on a bench.
public enum ImageFormat: String, Sendable, CaseIterable {
    case raw, gzip, xz, zstd

    public init(magic: some Collection<UInt8>) {
        let b = Array(magic.prefix(6))
        func starts(_ m: [UInt8]) -> Bool { b.count >= m.count && Array(b.prefix(m.count)) == m }
        if starts([0x1F, 0x8B]) { self = .gzip }
        else if starts([0xFD, 0x37, 0x7A, 0x58, 0x5A, 0x00]) { self = .xz }
        else if starts([0x28, 0xB5, 0x2F, 0xFD]) { self = .zstd }
        else { self = .raw }
    }
}
