import Crypto
import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif

/// A block map in bmaptool's XML format (versions 1.x and 2.0): which blocks of the image
/// hold data, and a checksum for each mapped range. Writing only mapped ranges is what makes
/// a 4 GiB image with 800 MiB of data take the time of 800 MiB.
public struct Bmap: Sendable, Equatable {
    public enum ChecksumType: String, Sendable { case sha1, sha256 }

    public struct Range: Sendable, Equatable {
        /// First and last block, inclusive, as in the file.
        public let first: UInt64
        public let last: UInt64
        /// Lower-case hex; nil in bmap files without per-range checksums.
        public let checksum: String?
    }

    public let version: String
    public let imageSize: UInt64
    public let blockSize: UInt64
    public let blocksCount: UInt64
    public let mappedBlocksCount: UInt64
    public let checksumType: ChecksumType
    public let ranges: [Range]
    public let path: String

    /// Byte ranges of mapped data, clipped to the image size.
    public var mappedByteRanges: [(start: UInt64, end: UInt64)] {
        ranges.map { ($0.first * blockSize, min(($0.last + 1) * blockSize, imageSize)) }
    }

    /// Every mapped range carries a checksum (bmap 1.3 and later): checking them proves every
    /// byte that is written.
    public var checksumsEveryRange: Bool { ranges.allSatisfy { $0.checksum != nil } }

    public var mappedBytes: UInt64 { mappedByteRanges.reduce(0) { $0 + ($1.end - $1.start) } }

    /// Finds the bmap next to an image the way bmaptool does: `IMAGE.bmap`, then with each
    /// extension stripped in turn (`disk.img.xz` → `disk.img.xz.bmap`, `disk.img.bmap`, `disk.bmap`).
    public static func locate(forImage imagePath: String) -> String? {
        var base = imagePath
        while true {
            let candidate = base + ".bmap"
            if FileManager.default.fileExists(atPath: candidate) { return candidate }
            let url = URL(fileURLWithPath: base)
            guard !url.pathExtension.isEmpty else { return nil }
            base = url.deletingPathExtension().path
        }
    }

    /// Refuses a bmap made for another image: its image size must be the image's (raw) or
    /// the size the compressed container states. The write engine and the config check both
    /// call this, before anything is written.
    public func checkSize(of source: ImageSource) throws(ImageIOError) {
        if source.format == .raw, let size = source.uncompressedSizeHint, size != imageSize {
            throw ImageIOError(.bmapMismatch, "bmap \(path) belongs to a different image: it describes \(imageSize) bytes, \(source.path) has \(size)")
        }
        // gzip's size is only its last four bytes: a truncated .gz ends in arbitrary bytes
        // there, and calling that "a different image" hid the real fault (issue 17). Its
        // stream tells (truncated, or ends before the bmap's end) once it is read.
        if source.format != .raw, source.format != .gzip, let hint = source.uncompressedSizeHint, hint != imageSize {
            throw ImageIOError(.bmapMismatch, "bmap \(path) belongs to a different image: it describes \(imageSize) bytes, \(source.path) decompresses to \(hint)")
        }
    }

    public static func load(path: String) throws(ImageIOError) -> Bmap {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ImageIOError(.bmapInvalid, "cannot read bmap file \(path)")
        }
        if let known = Parsed.shared.bmap(path: path, data: data) { return known }
        let bmap = try parse(data, path: path)
        Parsed.shared.keep(bmap, data: data)
        return bmap
    }

    /// The last few bmaps parsed, by path and content: every card of a batch loads the same
    /// file, and parsing its XML and checking its own checksum again cost each of 32 cards
    /// more than its capacity probe (issue 18). The file is read each time, so one changed in
    /// place is parsed again; only a valid bmap is kept.
    private final class Parsed: @unchecked Sendable {
        static let shared = Parsed()
        private let lock = NSLock()
        private var kept: [(data: Data, bmap: Bmap)] = []

        func bmap(path: String, data: Data) -> Bmap? {
            lock.withLock { kept.first { $0.bmap.path == path && $0.data == data }?.bmap }
        }

        func keep(_ bmap: Bmap, data: Data) {
            lock.withLock {
                kept.removeAll { $0.bmap.path == bmap.path }
                kept.append((data, bmap))
                if kept.count > 4 { kept.removeFirst() }
            }
        }
    }

    public static func parse(_ data: Data, path: String) throws(ImageIOError) -> Bmap {
        let reader = BmapXMLReader()
        let parser = XMLParser(data: data)
        parser.delegate = reader
        guard parser.parse(), reader.error == nil else {
            let why = reader.error ?? parser.parserError.map { "\($0.localizedDescription) at line \(parser.lineNumber)" } ?? "unreadable XML"
            throw ImageIOError(.bmapInvalid, "bmap file \(path) is invalid: \(why)")
        }
        func field(_ name: String) throws(ImageIOError) -> UInt64 {
            guard let text = reader.fields[name], let v = UInt64(text) else {
                throw ImageIOError(.bmapInvalid, "bmap file \(path) is invalid: missing or bad <\(name)>")
            }
            return v
        }
        guard let version = reader.version, let major = version.split(separator: ".").first.flatMap({ Int($0) }), major == 1 || major == 2 else {
            throw ImageIOError(.bmapInvalid, "bmap file \(path) has unsupported version \(reader.version ?? "none") (1.x and 2.0 are supported)")
        }
        let minor = version.split(separator: ".").dropFirst().first.flatMap { Int($0) } ?? 0
        let type: ChecksumType
        // 1.4 was released by mistake and is identical to 2.0 (bmaptool says so); 1.3 and
        // earlier know only SHA-1 (1.0–1.2 carry no checksums at all).
        if major >= 2 || (major == 1 && minor == 4) {
            guard let t = reader.fields["ChecksumType"].flatMap(ChecksumType.init(rawValue:)) else {
                throw ImageIOError(.bmapInvalid, "bmap file \(path) names no supported <ChecksumType> (sha1 or sha256)")
            }
            type = t
        } else {
            type = .sha1
        }
        let bmap = Bmap(version: version, imageSize: try field("ImageSize"), blockSize: try field("BlockSize"),
                        blocksCount: try field("BlocksCount"), mappedBlocksCount: try field("MappedBlocksCount"),
                        checksumType: type, ranges: reader.ranges, path: path)
        // Bounded, so that every offset and length worked out from it fits a file offset
        // (Int64): no image or card is 2^63 bytes, and bmaptool's blocks are 4 KiB.
        guard bmap.blockSize > 0, bmap.blockSize % 512 == 0, bmap.blockSize <= 1 << 30 else {
            throw ImageIOError(.bmapInvalid, "bmap file \(path) has an invalid block size \(bmap.blockSize)")
        }
        guard bmap.imageSize <= UInt64(Int64.max) - bmap.blockSize else {
            throw ImageIOError(.bmapInvalid, "bmap file \(path) is invalid: an image of \(bmap.imageSize) bytes is larger than any file or card")
        }
        guard bmap.blocksCount == bmap.imageSize / bmap.blockSize + (bmap.imageSize % bmap.blockSize == 0 ? 0 : 1) else {
            throw ImageIOError(.bmapInvalid, "bmap file \(path) is inconsistent: \(bmap.blocksCount) blocks of \(bmap.blockSize) bytes do not make \(bmap.imageSize) bytes")
        }
        var previousEnd: UInt64? = nil
        var mapped: UInt64 = 0
        for r in bmap.ranges {
            guard r.first <= r.last, r.last < bmap.blocksCount, previousEnd.map({ r.first > $0 }) ?? true else {
                throw ImageIOError(.bmapInvalid, "bmap file \(path) is invalid: range \(r.first)-\(r.last) is out of order or beyond \(bmap.blocksCount) blocks")
            }
            previousEnd = r.last
            mapped += r.last - r.first + 1
        }
        guard mapped == bmap.mappedBlocksCount else {
            throw ImageIOError(.bmapInvalid, "bmap file \(path) is invalid: ranges map \(mapped) blocks but MappedBlocksCount says \(bmap.mappedBlocksCount)")
        }
        try verifyFileChecksum(data, reader: reader, type: type, path: path)
        return bmap
    }

    /// bmaptool stores a checksum of the bmap file itself, computed with the checksum's own
    /// digits replaced by zeros. Checking it catches a bmap edited or damaged by hand.
    private static func verifyFileChecksum(_ data: Data, reader: BmapXMLReader, type: ChecksumType, path: String) throws(ImageIOError) {
        let stored = reader.fields["BmapFileChecksum"] ?? reader.fields["BmapFileSHA1"]
        guard let stored, !stored.isEmpty else { return }  // 1.0–1.2 have none.
        guard let text = String(data: data, encoding: .utf8), let r = text.range(of: stored) else {
            throw ImageIOError(.bmapInvalid, "bmap file \(path): cannot locate its own checksum")
        }
        let zeroed = text.replacingCharacters(in: r, with: String(repeating: "0", count: stored.count))
        let bytes = Data(zeroed.utf8)
        let fileType: ChecksumType = reader.fields["BmapFileSHA1"] != nil ? .sha1 : type
        let actual = fileType == .sha1 ? Insecure.SHA1.hash(data: bytes).hex : SHA256.hash(data: bytes).hex
        guard actual == stored.lowercased() else {
            throw ImageIOError(.bmapInvalid, "bmap file \(path) is damaged: its own checksum does not match (edited by hand?)")
        }
    }
}

extension Digest {
    var hex: String { map { String(format: "%02x", $0) }.joined() }
}

/// SAX reader for the handful of elements a bmap has.
private final class BmapXMLReader: NSObject, XMLParserDelegate {
    var version: String?
    var fields: [String: String] = [:]
    var ranges: [Bmap.Range] = []
    var error: String?
    private var text = ""
    private var rangeChecksum: String?

    func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?, attributes: [String: String] = [:]) {
        text = ""
        if name == "bmap" { version = attributes["version"]?.trimmingCharacters(in: .whitespaces) }
        if name == "Range" { rangeChecksum = (attributes["chksum"] ?? attributes["sha1"])?.lowercased() }
    }

    func parser(_ parser: XMLParser, foundCharacters string: String) { text += string }

    func parser(_ parser: XMLParser, didEndElement name: String, namespaceURI: String?, qualifiedName: String?) {
        let value = text.trimmingCharacters(in: .whitespacesAndNewlines)
        if name == "Range" {
            let parts = value.split(separator: "-").map { UInt64($0.trimmingCharacters(in: .whitespaces)) }
            guard (1...2).contains(parts.count), let first = parts[0], let last = parts.last! else {
                error = "bad <Range> \"\(value)\" at line \(parser.lineNumber)"
                parser.abortParsing()
                return
            }
            ranges.append(.init(first: first, last: last, checksum: rangeChecksum))
        } else if name != "bmap" && name != "BlockMap" {
            fields[name] = value
        }
        text = ""
    }
}
