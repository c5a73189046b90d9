import CLZMA
import CZlib
import CZstd

/// One streaming decompressor. `decode` consumes some of `input` and fills some of `output`;
/// it reports `finished` when the compressed stream has properly ended.
protocol StreamDecoder: AnyObject {
    func decode(input: UnsafeRawBufferPointer, output: UnsafeMutableRawBufferPointer, atEndOfInput: Bool) throws(DecodeFailure) -> (consumed: Int, produced: Int, finished: Bool)
    /// Like `decode`, but drops up to `count` decoded bytes instead of handing them out (an
    /// unmapped bmap range). By default they are decoded into `scratch`.
    func discard(_ count: Int, input: UnsafeRawBufferPointer, scratch: UnsafeMutableRawBufferPointer, atEndOfInput: Bool) throws(DecodeFailure) -> (consumed: Int, produced: Int, finished: Bool)
    /// Stops checking the container's checksum of the whole stream (before the first decode).
    /// Returns false where the format cannot skip it.
    func skipStreamChecksum() -> Bool
}

extension StreamDecoder {
    func discard(_ count: Int, input: UnsafeRawBufferPointer, scratch: UnsafeMutableRawBufferPointer, atEndOfInput: Bool) throws(DecodeFailure) -> (consumed: Int, produced: Int, finished: Bool) {
        try decode(input: input, output: UnsafeMutableRawBufferPointer(rebasing: scratch[..<min(count, scratch.count)]), atEndOfInput: atEndOfInput)
    }
}

/// What a decoder can say about a bad stream; `ImageSource` adds the file and offset.
enum DecodeFailure: Error {
    case corrupt(String)
    case truncated
    /// A valid stream that needs more memory to decode than provision gives a decoder.
    case needsTooMuchMemory(String)
    /// An archive with no disk image in it (the names of what it holds instead).
    case noImage([String])
    /// An archive with more than one file that could be the image.
    case severalImages([String])
    /// The input itself failed (a read error, a dropped download).
    case input(Error)
}

func makeDecoder(_ format: ImageFormat) -> StreamDecoder? {
    switch format {
    case .raw: return nil
    case .gzip: return GzipDecoder()
    case .xz: return XZDecoder()
    case .zstd: return ZstdDecoder()
    case .bzip2, .lz4, .lzop, .zip, .tar: return nil  // libarchive: see ArchiveReader
    }
}

/// A raw image arriving as a stream (over HTTP): its bytes as they come.
final class IdentityDecoder: StreamDecoder {
    func skipStreamChecksum() -> Bool { false }

    func decode(input: UnsafeRawBufferPointer, output: UnsafeMutableRawBufferPointer, atEndOfInput: Bool) throws(DecodeFailure) -> (consumed: Int, produced: Int, finished: Bool) {
        let n = min(input.count, output.count)
        if n > 0 { output.baseAddress!.copyMemory(from: input.baseAddress!, byteCount: n) }
        return (n, n, atEndOfInput && input.isEmpty)
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

    /// What one decoder may use: more than `xz -9` needs (65 MiB, its 64 MiB dictionary),
    /// as zstd's window is capped at 128 MiB. A header may ask for up to 4 GiB.
    static let memoryLimit: UInt64 = 128 << 20

    init() { start(flags: XZDecoder.concatenated) }

    deinit { lzma_end(&stream) }

    private func start(flags: UInt32) {
        let rc = lzma_stream_decoder(&stream, XZDecoder.memoryLimit, flags)
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
        case LZMA_MEMLIMIT_ERROR:
            let needed = (lzma_memusage(&stream) + (1 << 20) - 1) >> 20
            throw .needsTooMuchMemory("it needs \(needed) MiB of memory to decode (its dictionary), more than the \(XZDecoder.memoryLimit >> 20) MiB provision gives a decoder; recompress it with xz -9 or a lower preset")
        default: throw .corrupt("xz decoder error \(rc.rawValue)")
        }
    }
}

/// zstd through libzstd's buffer-less API, decoding into a round buffer of our own.
///
/// `ZSTD_decompressStream` decodes every block into its internal window and then copies it to
/// the caller; bytes the caller skips (the unmapped ranges of a bmap: 1.6 GiB of zeros in a
/// 2 GiB image with 400 MiB mapped) were copied out only to be dropped. Here skipped bytes
/// are decoded in place and never copied. The round buffer is sized and wrapped as zstd.h
/// prescribes for this API and as `ZSTD_decompressStream` does internally
/// (`ZSTD_decodingBufferSize_min`; start again at the buffer's beginning when another block
/// of `blockSizeMax` might not fit), so back-references always find their bytes.
/// Several frames in a row are decoded in turn; skippable frames are skipped.
final class ZstdDecoder: StreamDecoder {
    private let context: OpaquePointer
    /// Decoded bytes live in `window[0..<capacity]`; `pending` are not yet handed out.
    private var window: UnsafeMutableRawPointer?
    private var capacity = 0
    private var pendingStart = 0
    private var pendingEnd = 0
    /// The frame being decoded; nil between frames.
    private var frame: ZSTD_frameHeader?
    /// Input carried over from earlier calls, logically in front of the next call's input:
    /// the decoder needs each unit (header, block) contiguous, and units straddle reads.
    private let carry: UnsafeMutableRawPointer
    private static let carryCapacity = Int(ZSTD_BLOCKSIZE_MAX) + 64
    private var carryStart = 0
    private var carryEnd = 0
    /// Skippable frame content passed over so far (never carried: the decoder ignores it).
    private var skipped = 0
    /// Bytes of the current frame fed to the decoder: a skippable frame's first 8 (magic and
    /// length) are fed like any header, what follows is only counted.
    private var fedInFrame = 0
    private static let skippableHeaderSize = 8
    /// zstd's default limit: its streaming decoder refuses larger windows too.
    private static let maxWindow: UInt64 = 1 << 27

    init() {
        context = ZSTD_createDCtx()
        carry = .allocate(byteCount: ZstdDecoder.carryCapacity, alignment: 64)
    }

    deinit {
        ZSTD_freeDCtx(context)
        window?.deallocate()
        carry.deallocate()
    }

    /// The frame's XXH64 of its content: on a 2 GiB image it costs as much CPU as the rest of
    /// the decoding (0.2 s of 0.38 s measured with `zstd -d`).
    func skipStreamChecksum() -> Bool {
        // ZSTD_d_forceIgnoreChecksum, an "experimental" name zstd.h gives this stable value.
        ZSTD_isError(ZSTD_DCtx_setParameter(context, ZSTD_d_experimentalParam3, 1 /* ZSTD_d_ignoreChecksum */)) == 0
    }

    func decode(input: UnsafeRawBufferPointer, output: UnsafeMutableRawBufferPointer, atEndOfInput: Bool) throws(DecodeFailure) -> (consumed: Int, produced: Int, finished: Bool) {
        try run(input: input, into: output.baseAddress, count: output.count, atEndOfInput: atEndOfInput)
    }

    func discard(_ count: Int, input: UnsafeRawBufferPointer, scratch: UnsafeMutableRawBufferPointer, atEndOfInput: Bool) throws(DecodeFailure) -> (consumed: Int, produced: Int, finished: Bool) {
        try run(input: input, into: nil, count: count, atEndOfInput: atEndOfInput)
    }

    private var carried: Int { carryEnd - carryStart }

    /// When set, the bytes handed out are added to it in the pass that copies them out of
    /// the round buffer (the chunk's fingerprint without reading the chunk again).
    var fingerprinter: Fingerprinter?

    /// Hands out up to `count` decoded bytes (copied to `output`, or dropped when it is nil),
    /// decoding more as needed.
    private func run(input: UnsafeRawBufferPointer, into output: UnsafeMutableRawPointer?, count: Int, atEndOfInput: Bool) throws(DecodeFailure) -> (consumed: Int, produced: Int, finished: Bool) {
        var consumed = 0
        var produced = 0
        func starved() throws(DecodeFailure) -> (consumed: Int, produced: Int, finished: Bool) {
            if atEndOfInput && produced == 0 { throw .truncated }
            return (consumed, produced, false)
        }
        while produced < count {
            if pendingEnd > pendingStart {
                let n = min(pendingEnd - pendingStart, count - produced)
                if let output {
                    let piece = UnsafeRawBufferPointer(start: window! + pendingStart, count: n)
                    if fingerprinter != nil {
                        fingerprinter!.copy(piece, to: output + produced)
                    } else {
                        (output + produced).copyMemory(from: piece.baseAddress!, byteCount: n)
                    }
                }
                pendingStart += n
                produced += n
                continue
            }
            guard let frame else {
                // Between frames: the stream may end here, or another frame begins.
                if carried == 0 && consumed == input.count { return (consumed, produced, atEndOfInput) }
                guard try beginFrame(input, consumed: &consumed) else { return try starved() }
                continue
            }
            let needed = ZSTD_nextSrcSizeToDecompress(context)
            if needed == 0 { self.frame = nil; continue }  // frame complete
            if frame.frameType == ZSTD_skippableFrame && fedInFrame >= ZstdDecoder.skippableHeaderSize {
                // A skippable frame's content: pass over it; the decoder only counts it.
                let fromCarry = min(carried, needed - skipped)
                carryStart += fromCarry
                let fromInput = min(needed - skipped - fromCarry, input.count - consumed)
                consumed += fromInput
                skipped += fromCarry + fromInput
                if skipped < needed { return try starved() }
                skipped = 0
                let r = ZSTD_decompressContinue(context, nil, 0, carry, needed)
                if ZSTD_isError(r) != 0 { throw .corrupt(String(cString: ZSTD_getErrorName(r))) }
                continue
            }
            guard let source = try unit(needed, input, consumed: &consumed) else { return try starved() }
            if UInt64(capacity) < frame.frameContentSize && pendingEnd + Int(frame.blockSizeMax) > capacity {
                pendingStart = 0
                pendingEnd = 0
            }
            let r = ZSTD_decompressContinue(context, window.map { $0 + pendingEnd }, capacity - pendingEnd, source, needed)
            if ZSTD_isError(r) != 0 { throw .corrupt(String(cString: ZSTD_getErrorName(r))) }
            pendingEnd += r
            fedInFrame += needed
        }
        return (consumed, produced, false)
    }

    /// The next `count` bytes of input, contiguous: straight from `input` when they are all
    /// there, else gathered in `carry`. nil: not all arrived yet (what did is carried).
    private func unit(_ count: Int, _ input: UnsafeRawBufferPointer, consumed: inout Int) throws(DecodeFailure) -> UnsafeRawPointer? {
        let available = input.count - consumed
        if carried == 0 && available >= count {
            defer { consumed += count }
            return input.baseAddress! + consumed
        }
        if carried < count { try fillCarry(upTo: count, from: input, consumed: &consumed) }
        guard carried >= count else { return nil }
        defer {
            carryStart += count
            if carryStart == carryEnd { carryStart = 0; carryEnd = 0 }
        }
        return UnsafeRawPointer(carry + carryStart)
    }

    /// Moves input into `carry` until it holds `count` bytes or the input is used up.
    private func fillCarry(upTo count: Int, from input: UnsafeRawBufferPointer, consumed: inout Int) throws(DecodeFailure) {
        guard count <= ZstdDecoder.carryCapacity else { throw .corrupt("a block of \(count) bytes, larger than zstd allows") }
        if carryStart > 0 {
            carry.copyMemory(from: carry + carryStart, byteCount: carried)
            carryEnd -= carryStart
            carryStart = 0
        }
        let n = max(0, min(count - carried, input.count - consumed))
        if n > 0 { (carry + carryEnd).copyMemory(from: input.baseAddress! + consumed, byteCount: n) }
        carryEnd += n
        consumed += n
    }

    /// Reads the next frame's header (it stays unconsumed: the decoder reads it again) and
    /// sizes the round buffer for it. False: more input is needed.
    private func beginFrame(_ input: UnsafeRawBufferPointer, consumed: inout Int) throws(DecodeFailure) -> Bool {
        var header = ZSTD_frameHeader()
        var rc: Int
        if carried == 0 {
            rc = ZSTD_getFrameHeader(&header, input.baseAddress.map { $0 + consumed }, input.count - consumed)
        } else {
            rc = 1
        }
        if rc > 0 {
            // A header split across reads, or one that started in an earlier call.
            try fillCarry(upTo: Int(ZSTD_FRAMEHEADERSIZE_MAX), from: input, consumed: &consumed)
            rc = ZSTD_getFrameHeader(&header, carry + carryStart, carried)
        }
        if ZSTD_isError(rc) != 0 { throw .corrupt(String(cString: ZSTD_getErrorName(rc))) }
        if rc > 0 { return false }
        if header.frameType == ZSTD_frame {
            guard header.windowSize <= ZstdDecoder.maxWindow else {
                throw .corrupt("the frame needs a \(header.windowSize)-byte window, more than zstd's default limit of \(ZstdDecoder.maxWindow)")
            }
            let needed = ZSTD_decodingBufferSize_min(header.windowSize, header.frameContentSize)
            if ZSTD_isError(needed) != 0 { throw .corrupt(String(cString: ZSTD_getErrorName(needed))) }
            if needed > capacity {
                window?.deallocate()
                window = .allocate(byteCount: needed, alignment: 64)
                capacity = needed
            }
        }
        pendingStart = 0
        pendingEnd = 0
        fedInFrame = 0
        _ = ZSTD_decompressBegin(context)
        frame = header
        return true
    }
}
