#if canImport(Glibc)
import Glibc
#endif
import CLZMA
import CZstd
import SystemPackage

/// An image file read as a stream of its uncompressed bytes. The format is found by magic
/// bytes; decompression happens while reading, with no temporary file.
///
/// Not thread-safe: one reader thread owns it.
public final class ImageSource: @unchecked Sendable {
    public let path: String
    public let format: ImageFormat
    /// The compressor around a tar (`.tar.gz`: gzip), nil otherwise.
    public let archiveFilter: ImageFormat?
    /// The format as people name it: "gzip", "tar.xz".
    public var formatName: String {
        guard let archiveFilter else { return format.rawValue }
        return "tar.\(archiveFilter.rawValue)"
    }
    private let forcesRaw: Bool
    /// gzip, xz or zstd read through libarchive instead of our decoders: only for
    /// benchmarks/formats.sh, which measures both (`PROVISION_DECODER=libarchive`).
    private var viaLibarchive = false
    /// `PROVISION_DECODER`, read once (not at every image opened).
    private static let decoderOverride = getenv("PROVISION_DECODER").map { String(cString: $0) }
    /// The compressed (on-disk) size of the file.
    public let fileSize: UInt64
    /// The uncompressed size when the container says so (raw: the file size; zstd: the frame
    /// header; xz: the stream index; gzip: ISIZE when it cannot have wrapped). Used to refuse
    /// a card that is too small before the first byte is written.
    public let uncompressedSizeHint: UInt64?

    private let fd: Int32
    private let decoder: StreamDecoder?
    /// The long-tail formats' reader (libarchive); created with the read-ahead.
    private var archive: ArchiveReader?
    /// The compressed bytes, read ahead on a thread of their own; started by the first read
    /// (a source opened only for its size hint starts no thread).
    private var input: CompressedInput?
    /// Whether the compressed bytes are read around the page cache (nil: not started).
    var readsCompressedInputDirectly: Bool? { (input as? ReadAhead)?.opensDirect }
    /// A file on this machine (false: a stream, e.g. an HTTP body), which can be read again
    /// at any offset.
    public var isFile: Bool { fd >= 0 }
    /// For a download: bytes received so far and the announced total (progress and ETA).
    public var inputProgress: (@Sendable () -> (received: UInt64, total: UInt64?))?
    /// How a stream source is read again from its start (verification's error path).
    private var reopen: (@Sendable () throws(ImageIOError) -> ImageSource)?
    private var streamFinished = false
    /// Bytes of the file consumed by the decoder (for "corrupt at offset N").
    public private(set) var compressedOffset: UInt64 = 0
    /// Uncompressed bytes delivered so far.
    public private(set) var position: UInt64 = 0

    /// Set when this source is a cache file still being filled by a decompressor: reads wait
    /// until the bytes they need are there.
    private let fill: CacheFill?
    /// The format of the original image, when this is a decompressed cache of it.
    public let originalFormat: ImageFormat?

    /// Opens a decompressed cache file that another thread may still be filling.
    public convenience init(cachePath: String, filling: CacheFill, originalFormat: ImageFormat, size: UInt64) throws(ImageIOError) {
        try self.init(path: cachePath, fill: filling, originalFormat: originalFormat, sizeHint: size)
    }

    /// An image arriving as a stream (an HTTP body). `prefix` holds its first bytes (up to
    /// 1 MiB, or all of a shorter image), which `input` will still deliver; `size` is the
    /// stream's length where known. `reopen` starts the stream again from its first byte.
    public init(streamNamed name: String, input: CompressedInput, prefix: [UInt8], size: UInt64?, forceRaw: Bool = false,
                reopen: @escaping @Sendable () throws(ImageIOError) -> ImageSource) throws(ImageIOError) {
        self.path = name
        self.fill = nil
        self.originalFormat = nil
        self.forcesRaw = forceRaw
        self.fd = -1
        self.fileSize = size ?? 0
        // No listing without reading the whole stream: a second image in an archive is found
        // after the first (before the held-back first MiB is written).
        let kind = forceRaw ? Kind(format: .raw) : try ImageSource.identify(prefix: prefix, tail: [], name: name) { _ in nil }
        self.format = kind.format
        self.archiveFilter = kind.filter
        self.decoder = kind.format == .raw ? IdentityDecoder() : kind.format.isNative ? makeDecoder(kind.format) : nil
        self.checksStreamChecksum = kind.format != .raw && (decoder != nil || kind.format.isCompressor || kind.format == .zip || kind.filter != nil)
        self.input = input
        self.reopen = reopen
        self.uncompressedSizeHint = kind.format == .raw ? size : kind.size
    }

    /// - Parameter forceRaw: write the file as it is, whatever its first bytes say (`--raw`:
    ///   the rare raw image that starts like an archive).
    public convenience init(path: String, forceRaw: Bool = false) throws(ImageIOError) {
        try self.init(path: path, fill: nil, originalFormat: nil, sizeHint: nil, forceRaw: forceRaw)
    }

    private init(path: String, fill: CacheFill?, originalFormat: ImageFormat?, sizeHint: UInt64?, forceRaw: Bool = false) throws(ImageIOError) {
        self.path = path
        self.fill = fill
        self.originalFormat = originalFormat
        self.forcesRaw = forceRaw
        let fd: Int32
        switch Syscall.open(path, flags: O_RDONLY) {
        case .success(let f): fd = f
        case .failure(.noSuchFileOrDirectory):
            throw ImageIOError(.imageMissing, "image not found: \(path)")
        case .failure(let e):
            throw ImageIOError(.imageUnreadable, "cannot open image \(path): \(e)", errno: e)
        }
        guard case .success(let st) = Syscall.fstat(fd), (st.st_mode & S_IFMT) == S_IFREG || (st.st_mode & S_IFMT) == S_IFBLK else {
            Syscall.close(fd)
            throw ImageIOError(.imageUnreadable, "image \(path) is not a regular file")
        }
        // A cache file may not be sized yet by its filler: it will be `sizeHint` bytes.
        self.fileSize = fill != nil ? (sizeHint ?? UInt64(st.st_size)) : UInt64(st.st_size)
        // A cache file is raw by construction (its first bytes may still be a hole).
        let kind: Kind
        do throws(ImageIOError) {
            kind = fill != nil || forceRaw ? Kind(format: .raw) : try ImageSource.identify(fd: fd, path: path, fileSize: UInt64(st.st_size))
        } catch {
            Syscall.close(fd)
            throw error
        }
        self.fd = fd
        self.format = kind.format
        self.archiveFilter = kind.filter
        self.viaLibarchive = kind.format.isNative && kind.format != .raw && fill == nil
            && ImageSource.decoderOverride == "libarchive"
        self.decoder = kind.format.isNative && !viaLibarchive ? makeDecoder(kind.format) : nil
        self.checksStreamChecksum = decoder != nil || kind.format.isCompressor || kind.format == .zip || kind.filter != nil
        self.uncompressedSizeHint = sizeHint ?? kind.size ?? ImageSource.sizeHint(fd: fd, format: kind.format, fileSize: UInt64(st.st_size))
    }

    /// What `identify` found.
    struct Kind {
        var format: ImageFormat
        var filter: ImageFormat? = nil
        var size: UInt64? = nil
    }

    /// The image's format from its first (and last) bytes: refuses what provision does not
    /// write before anything is written, and looks inside compressed files for a tar.
    private static func identify(fd: Int32, path: String, fileSize: UInt64) throws(ImageIOError) -> Kind {
        func bytes(at offset: UInt64, _ count: Int) -> [UInt8] {
            var b = [UInt8](repeating: 0, count: count)
            let r = b.withUnsafeMutableBytes { Syscall.preadFully(fd, $0.baseAddress!, count, offset) }
            guard case .success(let n) = r else { return [] }
            return Array(b.prefix(n))
        }
        // Up to 1 MiB whatever the size says (a block device's st_size is 0).
        let prefix = bytes(at: 0, 1 << 20)
        let tail = fileSize >= 1024 ? bytes(at: fileSize - 512, 512) : []
        // The look was one-off: leave the page cache as the O_DIRECT read-ahead would.
        _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
        return try identify(prefix: prefix, tail: tail, name: path) { format in
            ArchiveReader.listCandidates(path: path, format: format)
        }
    }

    /// `prefix`: the first bytes (up to 1 MiB: enough to decode a tar header out of any
    /// compressor); `tail`: the last 512, where known; `list`: the archive's candidates
    /// without decompressing, where that is possible.
    static func identify(prefix: [UInt8], tail: [UInt8], name path: String,
                         list: (ImageFormat) -> [(name: String, size: UInt64?)]?) throws(ImageIOError) -> Kind {
        let head = Array(prefix.prefix(4096))
        guard !head.isEmpty else { return Kind(format: .raw) }
        if let unsupported = UnsupportedFormat.detect(head: head, tail: tail) {
            throw refusal(path, unsupported.name, unsupported.advice)
        }
        let outer = ImageFormat(magic: head)
        if outer.isCompressor {
            // Decode the start to see what is inside.
            guard let inner = prefix.withUnsafeBytes({ ArchiveReader.decodedHead(of: $0, count: 4096) }) else {
                return Kind(format: outer)  // the decoder will name the damage
            }
            if let unsupported = UnsupportedFormat.detect(head: inner, tail: []) {
                throw refusal(path, "\(outer.rawValue)-compressed \(unsupported.name)", unsupported.advice)
            }
            let innerFormat = ImageFormat(magic: inner)
            if innerFormat == .tar { return Kind(format: .tar, filter: outer, size: tarHeaderSize(inner)) }
            if innerFormat != .raw {
                throw refusal(path, "\(outer.rawValue)-compressed \(innerFormat.rawValue) file", "decompress it once, then write what is inside")
            }
            return Kind(format: outer)
        }
        if outer == .zip || outer == .tar {
            // A listing costs no decompression here: refuse a wrong archive up front.
            if let candidates = list(outer) {
                if candidates.isEmpty {
                    throw ImageIOError(.unsupportedFormat, "\(outer.rawValue) archive \(path) holds no disk image (only side files such as checksums or READMEs)")
                }
                if candidates.count > 1 {
                    throw severalImages(path, outer.rawValue, candidates.map(\.name))
                }
                return Kind(format: outer, size: candidates[0].size)
            }
            if outer == .tar { return Kind(format: .tar, size: tarHeaderSize(head)) }
        }
        return Kind(format: outer)
    }

    static func refusal(_ path: String, _ name: String, _ advice: String) -> ImageIOError {
        ImageIOError(.unsupportedFormat, "\(path) is a \(name), which provision does not write: \(advice). Nothing was written. (If it really is a raw disk image that happens to start with these bytes, pass --raw.)")
    }

    static func severalImages(_ path: String, _ format: String, _ names: [String]) -> ImageIOError {
        ImageIOError(.unsupportedFormat, "\(format) archive \(path) holds \(names.count) files that could be the disk image: \(names.joined(separator: ", ")); extract the one you mean and write that")
    }

    /// The size field of a tar header whose entry is a regular file that could be the image.
    private static func tarHeaderSize(_ header: [UInt8]) -> UInt64? {
        guard header.count >= 512, header[156] == 0x30 || header[156] == 0 else { return nil }
        let name = String(decoding: header[0..<100].prefix { $0 != 0 }, as: UTF8.self)
        guard ArchiveReader.isImageCandidate(name: name) else { return nil }
        let field = String(decoding: header[124..<136].prefix { $0 != 0 && $0 != 0x20 }, as: UTF8.self)
        return UInt64(field, radix: 8)
    }

    /// The image file's device and inode (a target must not be the image itself).
    var fileIdentity: (UInt64, UInt64)? {
        guard fill == nil, fd >= 0, case .success(let st) = Syscall.fstat(fd) else { return nil }
        return (UInt64(st.st_dev), UInt64(st.st_ino))
    }

    /// A second source reading the same image from its start (verification's error path).
    func reopened() throws(ImageIOError) -> ImageSource {
        if let reopen { return try reopen() }
        return try ImageSource(path: path, forceRaw: forcesRaw)
    }

    deinit {
        archive = nil  // before its input
        input = nil  // stops its thread
        if fd >= 0 { Syscall.close(fd) }
    }

    /// Waits until the bytes up to `offset` can be read without waiting (a cache file that
    /// is still being filled); returns at once for every other source. The writer calls it
    /// before taking a buffer, so a card that caught up with the decompressor waits without
    /// holding one.
    @discardableResult
    public func awaitBytes(upTo offset: UInt64) throws(ImageIOError) -> Bool {
        try fill?.wait(upTo: offset) ?? false
    }

    /// Fills `count` bytes (fewer only at the end of the image). Returns how many were filled.
    public func read(into destination: UnsafeMutableRawPointer, count: Int) throws(ImageIOError) -> Int {
        guard decoder != nil || !format.isNative || viaLibarchive else {
            try fill?.wait(upTo: position + UInt64(count))
            switch Syscall.preadFully(fd, destination, count, position) {
            case .success(let n): position += UInt64(n); return n
            case .failure(let e): throw ImageIOError(.imageUnreadable, "cannot read image \(path) at offset \(position): \(e)", offset: position, errno: e)
            }
        }
        return try decode(count, into: destination, scratch: nil)
    }

    /// `read(into:count:)`, adding the bytes to `fingerprinter`: zstd's in the pass that
    /// copies them out of its round buffer, the others' just after they land.
    func read(into destination: UnsafeMutableRawPointer, count: Int, adding fingerprinter: inout Fingerprinter) throws(ImageIOError) -> Int {
        guard let zstd = decoder as? ZstdDecoder else {
            let n = try read(into: destination, count: count)
            fingerprinter.update(UnsafeRawBufferPointer(start: destination, count: n))
            return n
        }
        zstd.fingerprinter = fingerprinter
        defer {
            fingerprinter = zstd.fingerprinter!
            zstd.fingerprinter = nil
        }
        return try decode(count, into: destination, scratch: nil)
    }

    /// Decodes up to `count` bytes into `destination`, or drops them (nil: a skip; decoders
    /// that cannot drop in place decode into `scratch`).
    private func decode(_ count: Int, into destination: UnsafeMutableRawPointer?, scratch: UnsafeMutableRawBufferPointer?) throws(ImageIOError) -> Int {
        if !format.isNative || viaLibarchive { return try readArchive(count, into: destination, scratch: scratch) }
        guard let decoder else { return 0 }
        func step(_ input: UnsafeRawBufferPointer, filled: Int, atEnd: Bool) throws(DecodeFailure) -> (consumed: Int, produced: Int, finished: Bool) {
            if let destination {
                return try decoder.decode(input: input, output: UnsafeMutableRawBufferPointer(start: destination + filled, count: count - filled), atEndOfInput: atEnd)
            }
            return try decoder.discard(count - filled, input: input, scratch: scratch!, atEndOfInput: atEnd)
        }
        var filled = 0
        while filled < count && !streamFinished {
            do {
                let inBuf = try compressedInput().available()
                let atEnd = inBuf.isEmpty  // the read-ahead waits for more unless the file ended
                let r = try step(inBuf, filled: filled, atEnd: atEnd)
                input?.consume(r.consumed)
                compressedOffset += UInt64(r.consumed)
                filled += r.produced
                if r.finished { streamFinished = true }
                if r.consumed == 0 && r.produced == 0 && atEnd && !r.finished {
                    // Input exhausted without the stream ending properly.
                    let again = try step(UnsafeRawBufferPointer(start: nil, count: 0), filled: filled, atEnd: true)
                    filled += again.produced
                    if again.finished { streamFinished = true }
                    if again.produced == 0 && !again.finished { throw DecodeFailure.truncated }
                }
            } catch DecodeFailure.truncated {
                throw ImageIOError(.compressedStreamTruncated, "\(formatName) stream in \(path) is truncated: it ends at byte \(compressedOffset) of the file after \(position + UInt64(filled)) uncompressed bytes", offset: compressedOffset)
            } catch DecodeFailure.corrupt(let why) {
                throw ImageIOError(.compressedStreamCorrupt, "\(formatName) stream in \(path) is corrupt near byte \(compressedOffset) of the file (\(why))", offset: compressedOffset)
            } catch DecodeFailure.needsTooMuchMemory(let why) {
                throw ImageIOError(.unsupportedFormat, "\(formatName) stream in \(path): \(why)", offset: compressedOffset)
            } catch let error as ImageIOError {
                throw error
            } catch {
                throw ImageIOError(.imageUnreadable, "cannot read image \(path): \(error)")
            }
        }
        position += UInt64(filled)
        return filled
    }

    /// Whether the container's checksum of the whole stream is checked (zstd's XXH64, xz's
    /// CRC; gzip's CRC-32 always is).
    public private(set) var checksStreamChecksum: Bool

    /// Stops checking the container's checksum of the whole stream, for a caller that proves
    /// every byte it uses another way: the bmap's checksum of each mapped range. Those cover
    /// all that is written; the container's covers the unmapped zeros too, and on a 2 GiB
    /// zstd image with 400 MiB mapped it doubled the decoder's CPU time. Damage still shows:
    /// as a decoding error, or as "image corrupt: blocks A–B" from the bmap check. Only
    /// before the first read.
    public func skipStreamChecksum() {
        precondition(position == 0 && compressedOffset == 0, "skipStreamChecksum() after reading")
        if let decoder, decoder.skipStreamChecksum() { checksStreamChecksum = false }
    }

    /// Reads (or, with no destination, drops) up to `count` bytes through libarchive.
    private func readArchive(_ count: Int, into destination: UnsafeMutableRawPointer?, scratch: UnsafeMutableRawBufferPointer?) throws(ImageIOError) -> Int {
        let reader: ArchiveReader
        if let archive { reader = archive } else {
            var input = try compressedInput()
            // A tar in gzip, xz or zstd: our own decoders unwrap it (see DecodedInput).
            if let filter = archiveFilter, filter.isNative, let decoder = makeDecoder(filter) {
                input = DecodedInput(input: input, decoder: decoder)
            }
            reader = ArchiveReader(input: input, layout: format == .zip || format == .tar ? .archive : .stream)
            archive = reader
        }
        var filled = 0
        do throws(DecodeFailure) {
            while filled < count {
                let want = destination == nil ? min(count - filled, scratch!.count) : count - filled
                let n = try reader.read(into: destination.map { $0 + filled } ?? scratch!.baseAddress!, count: want)
                if n == 0 { break }
                filled += n
            }
        } catch {
            compressedOffset = reader.inputOffset
            let at = position + UInt64(filled)
            switch error {
            case .truncated:
                throw ImageIOError(.compressedStreamTruncated, "\(formatName) stream in \(path) is truncated: it ends at byte \(compressedOffset) of the file after \(at) uncompressed bytes", offset: compressedOffset)
            case .corrupt(let why):
                throw ImageIOError(.compressedStreamCorrupt, "\(formatName) stream in \(path) is corrupt near byte \(compressedOffset) of the file (\(why))", offset: compressedOffset)
            case .needsTooMuchMemory(let why):
                throw ImageIOError(.unsupportedFormat, "\(formatName) stream in \(path): \(why)", offset: compressedOffset)
            case .noImage:
                throw ImageIOError(.unsupportedFormat, "\(formatName) archive \(path) holds no disk image (only directories or side files such as checksums or READMEs)")
            case .severalImages(let names):
                throw ImageSource.severalImages(path, formatName, names)
            case .input(let e as ImageIOError):
                throw e
            case .input(let e):
                throw ImageIOError(.imageUnreadable, "cannot read image \(path): \(e)")
            }
        }
        compressedOffset = reader.inputOffset
        position += UInt64(filled)
        return filled
    }

    /// Skips `count` uncompressed bytes (an unmapped bmap range): a seek for raw images,
    /// decode-and-discard for compressed ones.
    public func skip(_ count: UInt64, scratch: UnsafeMutableRawBufferPointer) throws(ImageIOError) {
        if decoder == nil && format.isNative && !viaLibarchive { position += count; return }
        var left = count
        while left > 0 {
            let n = try decode(Int(min(left, 1 << 30)), into: nil, scratch: scratch)
            if n == 0 { return }
            left -= UInt64(n)
        }
    }

    private func compressedInput() throws(ImageIOError) -> CompressedInput {
        if let input { return input }
        do {
            let started = try ReadAhead(path: path)
            input = started
            return started
        } catch {
            throw ImageIOError(.imageUnreadable, "cannot open image \(path): \(error)", errno: error)
        }
    }

    private static func sizeHint(fd: Int32, format: ImageFormat, fileSize: UInt64) -> UInt64? {
        func bytes(at offset: UInt64, _ count: Int) -> [UInt8]? {
            var b = [UInt8](repeating: 0, count: count)
            let r = b.withUnsafeMutableBytes { Syscall.preadFully(fd, $0.baseAddress!, count, offset) }
            guard case .success(count) = r else { return nil }
            return b
        }
        switch format {
        case .bzip2, .lz4, .lzop, .zip, .tar:
            return nil  // archives: their listing, in `identify`
        case .raw:
            return fileSize
        case .gzip:
            // ISIZE is the size modulo 2^32. gzip cannot expand more than ~1032:1, so when the
            // file is small enough it cannot have wrapped and the value is exact.
            guard fileSize >= 18, fileSize < (1 << 32) / 1032, let t = bytes(at: fileSize - 4, 4) else { return nil }
            return UInt64(t[0]) | UInt64(t[1]) << 8 | UInt64(t[2]) << 16 | UInt64(t[3]) << 24
        case .zstd:
            // A leading skippable frame (pzstd's) declares nothing of what follows it.
            guard let h = bytes(at: 0, min(18, Int(fileSize))), ImageFormat.afterSkippableFrame(h) == nil else { return nil }
            let size = h.withUnsafeBytes { ZSTD_getFrameContentSize($0.baseAddress, $0.count) }
            // Unknown or error values are the top two UInt64s; past Int64.max is no file offset,
            // and no card: a header that says so is not believed.
            return size > UInt64(Int64.max) ? nil : size
        case .xz:
            // Footer: CRC32, backward size, flags, "YZ". The index before it gives the size.
            guard fileSize >= 24, let footer = bytes(at: fileSize - 12, 12), footer[10] == 0x59, footer[11] == 0x5A else { return nil }
            let stored = UInt64(footer[4]) | UInt64(footer[5]) << 8 | UInt64(footer[6]) << 16 | UInt64(footer[7]) << 24
            let indexSize = (stored + 1) * 4
            guard indexSize + 12 <= fileSize, indexSize < (64 << 20), let index = bytes(at: fileSize - 12 - indexSize, Int(indexSize)) else { return nil }
            var idx: OpaquePointer?
            var memlimit: UInt64 = 64 << 20  // as XZBlockIndex: an index needing more is no image's
            var pos = 0
            let rc = index.withUnsafeBytes { lzma_index_buffer_decode(&idx, &memlimit, nil, $0.baseAddress!.assumingMemoryBound(to: UInt8.self), &pos, $0.count) }
            guard rc == LZMA_OK, let idx else { return nil }
            defer { lzma_index_end(idx, nil) }
            // Only trust it for single-stream files: the index covers its own stream alone.
            guard lzma_index_file_size(idx) == fileSize else { return nil }
            return lzma_index_uncompressed_size(idx)
        }
    }
}
