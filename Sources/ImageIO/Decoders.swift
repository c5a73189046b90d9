import CLZMA
import CZlib
import CZstd

/// One streaming decompressor. `decode` consumes some of `input` and fills some of `output`;
/// it reports `finished` when the compressed stream has properly ended.
protocol StreamDecoder: AnyObject {
    func decode(input: UnsafeRawBufferPointer, output: UnsafeMutableRawBufferPointer, atEndOfInput: Bool) throws(DecodeFailure) -> (consumed: Int, produced: Int, finished: Bool)
    /// Stops checking the container's checksum of the whole stream (before the first decode).
    /// Returns false where the format cannot skip it.
    func skipStreamChecksum() -> Bool
}

/// What a decoder can say about a bad stream; `ImageSource` adds the file and offset.
enum DecodeFailure: Error {
    case corrupt(String)
    case truncated
}

func makeDecoder(_ format: ImageFormat) -> StreamDecoder? {
    switch format {
    case .raw: return nil
    case .gzip: return GzipDecoder()
    case .xz: return XZDecoder()
    case .zstd: return ZstdDecoder()
    }
}

/// gzip through zlib, accepting concatenated members as gzip(1) does.
final class GzipDecoder: StreamDecoder {
    private var stream = z_stream()
    private var memberEnded = false

    init() {
        // 15 + 32: the largest window, and let zlib detect the gzip header.
        let rc = inflateInit2_(&stream, 15 + 32, zlibVersion(), Int32(MemoryLayout<z_stream>.size))
        precondition(rc == Z_OK, "inflateInit2 failed: \(rc)")
    }

    deinit { inflateEnd(&stream) }

    /// zlib checks the CRC-32 of every gzip member; at ~1 GB/s of inflate it is a small part.
    func skipStreamChecksum() -> Bool { false }

    func decode(input: UnsafeRawBufferPointer, output: UnsafeMutableRawBufferPointer, atEndOfInput: Bool) throws(DecodeFailure) -> (consumed: Int, produced: Int, finished: Bool) {
        if memberEnded {
            // Another member follows, or trailing bytes: gzip(1) accepts further members only.
            guard !input.isEmpty else { return (0, 0, atEndOfInput) }
            inflateReset(&stream)
            memberEnded = false
        }
        if input.isEmpty && atEndOfInput { throw .truncated }
        stream.next_in = UnsafeMutablePointer(mutating: input.baseAddress?.assumingMemoryBound(to: Bytef.self))
        stream.avail_in = uInt(input.count)
        stream.next_out = output.baseAddress?.assumingMemoryBound(to: Bytef.self)
        stream.avail_out = uInt(output.count)
        let rc = inflate(&stream, Z_NO_FLUSH)
        let consumed = input.count - Int(stream.avail_in)
        let produced = output.count - Int(stream.avail_out)
        switch rc {
        case Z_STREAM_END:
            memberEnded = true
            return (consumed, produced, atEndOfInput && consumed == input.count)
        case Z_OK:
            return (consumed, produced, false)
        case Z_BUF_ERROR:
            if atEndOfInput && consumed == 0 && produced == 0 { throw .truncated }
            return (consumed, produced, false)
        default:
            let msg = stream.msg.map { String(cString: $0) } ?? "zlib error \(rc)"
            throw .corrupt(msg)
        }
    }
}

/// xz through liblzma; LZMA_CONCATENATED accepts multi-stream files like xz(1).
final class XZDecoder: StreamDecoder {
    private var stream = lzma_stream()
    // Macros Swift cannot import.
    private static let concatenated: UInt32 = 0x08  // LZMA_CONCATENATED
    private static let ignoreCheck: UInt32 = 0x10  // LZMA_IGNORE_CHECK

    init() { start(flags: XZDecoder.concatenated) }

    deinit { lzma_end(&stream) }

    private func start(flags: UInt32) {
        let rc = lzma_stream_decoder(&stream, UInt64.max, flags)
        precondition(rc == LZMA_OK, "lzma_stream_decoder failed: \(rc)")
    }

    func skipStreamChecksum() -> Bool {
        lzma_end(&stream)
        stream = lzma_stream()
        start(flags: XZDecoder.concatenated | XZDecoder.ignoreCheck)
        return true
    }

    func decode(input: UnsafeRawBufferPointer, output: UnsafeMutableRawBufferPointer, atEndOfInput: Bool) throws(DecodeFailure) -> (consumed: Int, produced: Int, finished: Bool) {
        stream.next_in = input.baseAddress?.assumingMemoryBound(to: UInt8.self)
        stream.avail_in = input.count
        stream.next_out = output.baseAddress?.assumingMemoryBound(to: UInt8.self)
        stream.avail_out = output.count
        let rc = lzma_code(&stream, atEndOfInput ? LZMA_FINISH : LZMA_RUN)
        let consumed = input.count - stream.avail_in
        let produced = output.count - stream.avail_out
        switch rc {
        case LZMA_OK: return (consumed, produced, false)
        case LZMA_STREAM_END: return (consumed, produced, true)
        case LZMA_BUF_ERROR:
            if atEndOfInput { throw .truncated }
            return (consumed, produced, false)
        case LZMA_DATA_ERROR: throw .corrupt("xz data is corrupt")
        case LZMA_FORMAT_ERROR: throw .corrupt("not an xz stream")
        case LZMA_OPTIONS_ERROR: throw .corrupt("unsupported xz options")
        case LZMA_MEM_ERROR: throw .corrupt("out of memory while decoding xz")
        default: throw .corrupt("xz decoder error \(rc.rawValue)")
        }
    }
}

/// zstd through libzstd's streaming API; several frames in a row are decoded in turn.
final class ZstdDecoder: StreamDecoder {
    private let stream: OpaquePointer
    private var frameOpen = false

    init() {
        stream = ZSTD_createDStream()
        ZSTD_initDStream(stream)
    }

    deinit { ZSTD_freeDStream(stream) }

    /// The frame's XXH64 of its content: on a 2 GiB image it costs as much CPU as the rest of
    /// the decoding (0.2 s of 0.38 s measured with `zstd -d`).
    func skipStreamChecksum() -> Bool {
        // ZSTD_d_forceIgnoreChecksum, an "experimental" name zstd.h gives this stable value.
        ZSTD_isError(ZSTD_DCtx_setParameter(stream, ZSTD_d_experimentalParam3, 1 /* ZSTD_d_ignoreChecksum */)) == 0
    }

    func decode(input: UnsafeRawBufferPointer, output: UnsafeMutableRawBufferPointer, atEndOfInput: Bool) throws(DecodeFailure) -> (consumed: Int, produced: Int, finished: Bool) {
        if input.isEmpty && atEndOfInput {
            if frameOpen {
                // Flush whatever the decoder still holds before calling it truncated.
                var inBuf = ZSTD_inBuffer(src: nil, size: 0, pos: 0)
                var outBuf = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
                let rc = ZSTD_decompressStream(stream, &outBuf, &inBuf)
                if ZSTD_isError(rc) != 0 { throw .corrupt(String(cString: ZSTD_getErrorName(rc))) }
                if outBuf.pos > 0 { return (0, outBuf.pos, false) }
                throw .truncated
            }
            return (0, 0, true)
        }
        var inBuf = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        var outBuf = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
        let rc = ZSTD_decompressStream(stream, &outBuf, &inBuf)
        if ZSTD_isError(rc) != 0 { throw .corrupt(String(cString: ZSTD_getErrorName(rc))) }
        // rc == 0: a frame is complete and fully flushed.
        frameOpen = rc != 0
        return (inBuf.pos, outBuf.pos, false)
    }
}
