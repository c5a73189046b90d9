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
    /// The compressed (on-disk) size of the file.
    public let fileSize: UInt64
    /// The uncompressed size when the container says so (raw: the file size; zstd: the frame
    /// header; xz: the stream index; gzip: ISIZE when it cannot have wrapped). Used to refuse
    /// a card that is too small before the first byte is written.
    public let uncompressedSizeHint: UInt64?

    private let fd: Int32
    private let decoder: StreamDecoder?
    /// The compressed bytes, read ahead on a thread of their own; started by the first read
    /// (a source opened only for its size hint starts no thread).
    private var input: ReadAhead?
    /// Whether the compressed bytes are read around the page cache (nil: not started).
    var readsCompressedInputDirectly: Bool? { input?.opensDirect }
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

    public convenience init(path: String) throws(ImageIOError) {
        try self.init(path: path, fill: nil, originalFormat: nil, sizeHint: nil)
    }

    private init(path: String, fill: CacheFill?, originalFormat: ImageFormat?, sizeHint: UInt64?) throws(ImageIOError) {
        self.path = path
        self.fill = fill
        self.originalFormat = originalFormat
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
        var magic = [UInt8](repeating: 0, count: 8)
        let got = magic.withUnsafeMutableBytes { Syscall.preadFully(fd, $0.baseAddress!, 8, 0) }
        guard case .success(let n) = got else {
            Syscall.close(fd)
            throw ImageIOError(.imageUnreadable, "cannot read image \(path)")
        }
        self.fd = fd
        // A cache file may not be sized yet by its filler: it will be `sizeHint` bytes.
        self.fileSize = fill != nil ? (sizeHint ?? UInt64(st.st_size)) : UInt64(st.st_size)
        // A cache file is raw by construction (its first bytes may still be a hole).
        self.format = fill != nil || n == 0 ? .raw : ImageFormat(magic: magic.prefix(n))
        self.decoder = makeDecoder(format)
        self.checksStreamChecksum = decoder != nil
        self.uncompressedSizeHint = sizeHint ?? ImageSource.sizeHint(fd: fd, format: format, fileSize: UInt64(st.st_size))
    }

    deinit {
        input = nil  // stops its thread
        Syscall.close(fd)
    }

    /// Fills `count` bytes (fewer only at the end of the image). Returns how many were filled.
    public func read(into destination: UnsafeMutableRawPointer, count: Int) throws(ImageIOError) -> Int {
        guard decoder != nil else {
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
                throw ImageIOError(.compressedStreamTruncated, "\(format.rawValue) stream in \(path) is truncated: it ends at byte \(compressedOffset) of the file after \(position + UInt64(filled)) uncompressed bytes", offset: compressedOffset)
            } catch DecodeFailure.corrupt(let why) {
                throw ImageIOError(.compressedStreamCorrupt, "\(format.rawValue) stream in \(path) is corrupt near byte \(compressedOffset) of the file (\(why))", offset: compressedOffset)
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
        precondition(position == 0 && input == nil, "skipStreamChecksum() after reading")
        if let decoder, decoder.skipStreamChecksum() { checksStreamChecksum = false }
    }

    /// Skips `count` uncompressed bytes (an unmapped bmap range): a seek for raw images,
    /// decode-and-discard for compressed ones.
    public func skip(_ count: UInt64, scratch: UnsafeMutableRawBufferPointer) throws(ImageIOError) {
        if decoder == nil { position += count; return }
        var left = count
        while left > 0 {
            let n = try decode(Int(min(left, 1 << 30)), into: nil, scratch: scratch)
            if n == 0 { return }
            left -= UInt64(n)
        }
    }

    private func compressedInput() throws(ImageIOError) -> ReadAhead {
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
        case .raw:
            return fileSize
        case .gzip:
            // ISIZE is the size modulo 2^32. gzip cannot expand more than ~1032:1, so when the
            // file is small enough it cannot have wrapped and the value is exact.
            guard fileSize >= 18, fileSize * 1032 < (1 << 32), let t = bytes(at: fileSize - 4, 4) else { return nil }
            return UInt64(t[0]) | UInt64(t[1]) << 8 | UInt64(t[2]) << 16 | UInt64(t[3]) << 24
        case .zstd:
            guard let h = bytes(at: 0, min(18, Int(fileSize))) else { return nil }
            let size = h.withUnsafeBytes { ZSTD_getFrameContentSize($0.baseAddress, $0.count) }
            // Unknown or error values are the top two UInt64s.
            return size >= UInt64.max - 1 ? nil : size
        case .xz:
            // Footer: CRC32, backward size, flags, "YZ". The index before it gives the size.
            guard fileSize >= 24, let footer = bytes(at: fileSize - 12, 12), footer[10] == 0x59, footer[11] == 0x5A else { return nil }
            let stored = UInt64(footer[4]) | UInt64(footer[5]) << 8 | UInt64(footer[6]) << 16 | UInt64(footer[7]) << 24
            let indexSize = (stored + 1) * 4
            guard indexSize + 12 <= fileSize, indexSize < (64 << 20), let index = bytes(at: fileSize - 12 - indexSize, Int(indexSize)) else { return nil }
            var idx: OpaquePointer?
            var memlimit = UInt64.max
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
