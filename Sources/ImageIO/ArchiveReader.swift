#if canImport(Glibc)
import Glibc
#endif
import CArchive

/// Where compressed bytes come from: a file read ahead on its own thread (`ReadAhead`), or an
/// HTTP body as it arrives. `available()` blocks until there are bytes, and returns an empty
/// buffer at the end; the bytes stay valid until the next call.
public protocol CompressedInput: AnyObject {
    func available() throws -> UnsafeRawBufferPointer
    func consume(_ count: Int)
}

extension ReadAhead: CompressedInput {}

/// The bytes of a gzip, xz or zstd stream, decoded by our own decoders: a `.tar.gz`'s tar
/// reaches libarchive already decompressed. Faster than libarchive's filters, and safer:
/// libarchive's gzip filter does not check the CRC-32 (a damaged .tar.gz of stored data
/// came through as "done"), zlib here does.
final class DecodedInput: CompressedInput {
    private let input: CompressedInput
    private let decoder: StreamDecoder
    private let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 64)
    private var start = 0
    private var end = 0
    private var finished = false
    /// Compressed bytes consumed (for "truncated at byte N of the file").
    private(set) var compressedOffset: UInt64 = 0

    init(input: CompressedInput, decoder: StreamDecoder) {
        self.input = input
        self.decoder = decoder
    }

    deinit { buffer.deallocate() }

    func available() throws -> UnsafeRawBufferPointer {
        if start < end { return UnsafeRawBufferPointer(rebasing: buffer[start..<end]) }
        start = 0
        end = 0
        while end == 0 && !finished {
            let inBuf = try input.available()
            let atEnd = inBuf.isEmpty
            let r = try decoder.decode(input: inBuf, output: buffer, atEndOfInput: atEnd)
            input.consume(r.consumed)
            compressedOffset += UInt64(r.consumed)
            end = r.produced
            if r.finished { finished = true }
            if r.consumed == 0 && r.produced == 0 && atEnd && !r.finished { throw DecodeFailure.truncated }
        }
        return UnsafeRawBufferPointer(rebasing: buffer[start..<end])
    }

    func consume(_ count: Int) { start += count }
}

/// One image read through libarchive (bzip2, lz4, lzop, zip, tar and compressed tars), pulled
/// from a `CompressedInput`, so a file and an HTTP body are read the same way and nothing is
/// extracted to a temporary file.
///
/// In an archive, the image is the one regular file that is not a side file (a checksum, a
/// bmap, a README); a second candidate is an error that names both, because writing either
/// one could be the wrong card.
final class ArchiveReader {
    enum Layout {
        /// A compressed stream of the image itself (.bz2, .lz4, .lzo).
        case stream
        /// A tar or zip holding the image (the tar possibly compressed).
        case archive
    }

    /// What the read callback needs; a class of its own so libarchive holds a pointer to it,
    /// not to the reader (which owns the archive).
    private final class Feed {
        let input: CompressedInput
        var handed = 0
        var reachedEnd = false
        var failure: Error?
        init(input: CompressedInput) { self.input = input }

        func next(_ out: UnsafeMutablePointer<UnsafeRawPointer?>) -> Int {
            input.consume(handed)
            handed = 0
            do {
                let bytes = try input.available()
                if bytes.isEmpty { reachedEnd = true }
                handed = bytes.count
                out.pointee = bytes.baseAddress.map { UnsafeRawPointer($0) }
                return bytes.count
            } catch {
                failure = error
                return Int(ARCHIVE_FATAL)
            }
        }
    }

    private let archive: OpaquePointer
    private let feed: Feed
    private let layout: Layout
    /// Name of the entry being read (an archive's image; "data" for a stream).
    private(set) var entryName: String?
    private(set) var entrySize: UInt64?
    private var opened = false
    private var entryEnded = false

    init(input: CompressedInput, layout: Layout) {
        self.feed = Feed(input: input)
        self.layout = layout
        self.archive = archive_read_new()
        ArchiveReader.enableFilters(archive)
        switch layout {
        case .stream: archive_read_support_format_raw(archive)
        case .archive:
            archive_read_support_format_tar(archive)
            archive_read_support_format_gnutar(archive)
            archive_read_support_format_zip_streamable(archive)
        }
    }

    deinit { archive_read_free(archive) }

    /// The compressors a stream or a tar may use. Not `filter_all`: that adds uuencode, rpm
    /// and external programs nobody ships disk images in.
    static func enableFilters(_ a: OpaquePointer) {
        archive_read_support_filter_gzip(a)
        archive_read_support_filter_xz(a)
        archive_read_support_filter_zstd(a)
        archive_read_support_filter_bzip2(a)
        archive_read_support_filter_lz4(a)
        // Debian's libarchive has no liblzo2: it runs the lzop program (package lzop).
        archive_read_support_filter_lzop(a)
    }

    /// Bytes of the input consumed so far (for "truncated at byte N").
    var inputOffset: UInt64 {
        if let decoded = feed.input as? DecodedInput { return decoded.compressedOffset }
        return opened ? UInt64(max(0, archive_filter_bytes(archive, -1))) : 0
    }

    /// Fills up to `count` bytes of the image; 0 at its end.
    func read(into destination: UnsafeMutableRawPointer, count: Int) throws(DecodeFailure) -> Int {
        if !opened { try open() }
        if entryEnded { return 0 }
        var filled = 0
        while filled < count {
            let n = archive_read_data(archive, destination + filled, count - filled)
            if n == 0 {
                entryEnded = true
                if layout == .archive { try checkNoOtherImage() }
                break
            }
            if n < 0 { throw failure() }
            filled += n
        }
        return filled
    }

    private func open() throws(DecodeFailure) {
        opened = true
        let context = Unmanaged.passUnretained(feed).toOpaque()
        let rc = archive_read_open(archive, context, nil, { _, context, out in
            Unmanaged<Feed>.fromOpaque(context!).takeUnretainedValue().next(out!)
        }, nil)
        if rc != ARCHIVE_OK && rc != ARCHIVE_WARN { throw failure() }
        var entry: OpaquePointer?
        while true {
            let h = archive_read_next_header(archive, &entry)
            if h == ARCHIVE_EOF {
                throw layout == .archive ? .noImage([]) : .truncated
            }
            if h != ARCHIVE_OK && h != ARCHIVE_WARN { throw failure() }
            guard let entry else { throw failure() }
            if layout == .stream || ArchiveReader.isImageCandidate(entry) {
                entryName = archive_entry_pathname(entry).map { String(cString: $0) }
                entrySize = archive_entry_size_is_set(entry) != 0 ? UInt64(max(0, archive_entry_size(entry))) : nil
                return
            }
        }
    }

    /// After the image: the rest of the archive must hold no second image.
    private func checkNoOtherImage() throws(DecodeFailure) {
        var entry: OpaquePointer?
        var others: [String] = []
        while true {
            let h = archive_read_next_header(archive, &entry)
            if h == ARCHIVE_EOF { break }
            if h != ARCHIVE_OK && h != ARCHIVE_WARN { throw failure() }
            if let entry, ArchiveReader.isImageCandidate(entry), let name = archive_entry_pathname(entry) {
                others.append(String(cString: name))
            }
        }
        if !others.isEmpty { throw .severalImages([entryName ?? "?"] + others) }
    }

    /// Classifies libarchive's error: input that ran out is truncation, anything else damage.
    private func failure() -> DecodeFailure {
        if let error = feed.failure as? DecodeFailure { return error }
        if let error = feed.failure { return .input(error) }
        let message = archive_error_string(archive).map { String(cString: $0) } ?? "libarchive error \(archive_errno(archive))"
        let lower = message.lowercased()
        if feed.reachedEnd || lower.contains("truncated") || lower.contains("premature end") || lower.contains("unexpected end") {
            return .truncated
        }
        return .corrupt(message)
    }

    /// Side files that travel with images and are not the image.
    static func isImageCandidate(_ entry: OpaquePointer) -> Bool {
        guard archive_entry_filetype(entry) == 0o100000 /* AE_IFREG */, let p = archive_entry_pathname(entry) else { return false }
        return isImageCandidate(name: String(cString: p))
    }

    static func isImageCandidate(name path: String) -> Bool {
        let name = path.split(separator: "/").last.map(String.init) ?? path
        let lower = name.lowercased()
        if path.hasPrefix("__MACOSX/") || name.hasPrefix("._") || name == ".DS_Store" { return false }
        let sideSuffixes = [".bmap", ".sha1", ".sha256", ".sha512", ".md5", ".sig", ".asc", ".gpg",
                            ".txt", ".md", ".json", ".xml", ".html", ".pdf", ".sum", ".info"]
        if sideSuffixes.contains(where: { lower.hasSuffix($0) }) { return false }
        let sideNames = ["readme", "license", "licence", "copying", "changelog", "notice", "sha256sums", "sha1sums", "md5sums"]
        return !sideNames.contains(where: { lower.hasPrefix($0) })
    }

    // MARK: - Looking before reading

    /// The first `count` uncompressed bytes of a compressed `prefix` (the file's first bytes),
    /// or nil when libarchive cannot decode that much of it: tells a .tar.gz from a .img.gz,
    /// and finds a qcow2 inside an .xz before anything is written.
    static func decodedHead(of prefix: UnsafeRawBufferPointer, count: Int) -> [UInt8]? {
        let a = archive_read_new()!
        defer { archive_read_free(a) }
        enableFilters(a)
        archive_read_support_format_raw(a)
        guard archive_read_open_memory(a, prefix.baseAddress, prefix.count) == ARCHIVE_OK else { return nil }
        var entry: OpaquePointer?
        guard archive_read_next_header(a, &entry) == ARCHIVE_OK else { return nil }
        var out = [UInt8](repeating: 0, count: count)
        var filled = 0
        while filled < count {
            let n = out.withUnsafeMutableBytes { archive_read_data(a, $0.baseAddress! + filled, count - filled) }
            if n <= 0 { break }
            filled += n
        }
        return filled > 0 ? Array(out.prefix(filled)) : nil
    }

    /// The image candidates of an archive file, with their sizes, listed without decompressing:
    /// zip's central directory, or a plain tar's headers (its data is seeked over). nil where
    /// listing would mean decompressing the whole archive (a compressed tar).
    static func listCandidates(path: String, format: ImageFormat) -> [(name: String, size: UInt64?)]? {
        let a = archive_read_new()!
        defer { archive_read_free(a) }
        switch format {
        case .zip: archive_read_support_format_zip_seekable(a)
        case .tar: archive_read_support_format_tar(a); archive_read_support_format_gnutar(a)
        default: return nil
        }
        guard archive_read_open_filename(a, path, 1 << 16) == ARCHIVE_OK else { return nil }
        var found: [(name: String, size: UInt64?)] = []
        var entry: OpaquePointer?
        while true {
            let h = archive_read_next_header(a, &entry)
            if h == ARCHIVE_EOF { break }
            guard h == ARCHIVE_OK || h == ARCHIVE_WARN, let entry else { return nil }
            if isImageCandidate(entry), let p = archive_entry_pathname(entry) {
                found.append((String(cString: p), archive_entry_size_is_set(entry) != 0 ? UInt64(max(0, archive_entry_size(entry))) : nil))
            }
        }
        return found
    }
}
