#if canImport(Glibc)
import Glibc
#endif
import CLZMA

/// One block of an .xz file, as its stream's index lists it: where its compressed bytes are
/// in the file and where its uncompressed bytes go in the image.
struct XZBlock: Sendable, Equatable {
    /// 1-based, counted over the whole file (as `xz --list -vv` numbers them).
    let number: UInt64
    /// File offset of the block header.
    let compressedOffset: UInt64
    /// Header + compressed data + padding + check.
    let totalSize: UInt64
    /// `totalSize` without the padding: what `lzma_block_compressed_size` validates against.
    let unpaddedSize: UInt64
    let uncompressedOffset: UInt64
    let uncompressedSize: UInt64
    /// The stream's check type (`lzma_check` raw value): every block of a stream has it.
    let check: UInt32

    var uncompressedEnd: UInt64 { uncompressedOffset + uncompressedSize }
}

/// Reads the block list of a seekable .xz file from its indexes (one per stream, read from the
/// end of the file backwards by liblzma's file-info decoder, which also handles stream padding
/// and concatenated streams), without decompressing anything.
enum XZBlockIndex {
    /// nil when the index cannot be read (a truncated or damaged file): the caller falls
    /// back to decoding the file as a stream, which names the damage.
    static func read(fd: Int32, fileSize: UInt64) -> [XZBlock]? {
        var stream = lzma_stream()
        var index: OpaquePointer?
        // The index of an 8 GiB image in 1 MiB blocks is ~100 KiB of memory in liblzma; 64 MiB
        // only guards against a forged file.
        guard lzma_file_info_decoder(&stream, &index, 64 << 20, fileSize) == LZMA_OK else { return nil }
        defer {
            lzma_end(&stream)
            if let index { lzma_index_end(index, nil) }
        }
        let capacity = 64 << 10
        let buffer = UnsafeMutablePointer<UInt8>.allocate(capacity: capacity)
        defer { buffer.deallocate() }
        var position: UInt64 = 0
        while true {
            if stream.avail_in == 0 {
                // Nothing more where the file should go on: it shrank under us.
                guard case .success(let n) = Syscall.preadFully(fd, buffer, capacity, position), n > 0 || position >= fileSize else { return nil }
                stream.next_in = UnsafePointer(buffer)
                stream.avail_in = n
                position += UInt64(n)
            }
            let atEnd = position >= fileSize && stream.avail_in == 0
            let rc = lzma_code(&stream, atEnd ? LZMA_FINISH : LZMA_RUN)
            switch rc {
            case LZMA_OK:
                if atEnd { return nil }
            case LZMA_SEEK_NEEDED:
                position = stream.seek_pos
                stream.avail_in = 0
            case LZMA_STREAM_END:
                guard let index else { return nil }
                return blocks(of: index)
            default:
                return nil
            }
        }
    }

    private static func blocks(of index: OpaquePointer) -> [XZBlock] {
        var iterator = lzma_index_iter()
        lzma_index_iter_init(&iterator, index)
        var blocks: [XZBlock] = []
        // lzma_index_iter_next returns true when there are no more blocks.
        while lzma_index_iter_next(&iterator, LZMA_INDEX_ITER_BLOCK) == 0 {
            let b = iterator.block
            blocks.append(XZBlock(number: b.number_in_file, compressedOffset: b.compressed_file_offset,
                                  totalSize: b.total_size, unpaddedSize: b.unpadded_size,
                                  uncompressedOffset: b.uncompressed_file_offset, uncompressedSize: b.uncompressed_size,
                                  check: iterator.stream.flags?.pointee.check.rawValue ?? LZMA_CHECK_NONE.rawValue))
        }
        return blocks
    }
}

/// A block's header decoded into the `lzma_block` its decoder needs, with the filter chain
/// liblzma allocated for it (released when this goes away).
final class XZBlockHeader {
    /// LZMA_FILTERS_MAX + 1: the chain ends with an LZMA_VLI_UNKNOWN id.
    private let filters: UnsafeMutablePointer<lzma_filter>
    private(set) var options: lzma_block

    private init(filters: UnsafeMutablePointer<lzma_filter>, options: lzma_block) {
        self.filters = filters
        self.options = options
    }

    deinit {
        lzma_filters_free(filters, nil)
        filters.deallocate()
    }

    /// Memory liblzma's decoder takes for this block (the LZMA2 dictionary, mostly).
    var decoderMemory: UInt64 { lzma_raw_decoder_memusage(filters) }

    /// Reads and decodes the header of `block` from `fd` into `scratch` (≥ 1024 bytes: a
    /// header is at most 1024).
    static func read(fd: Int32, block: XZBlock, scratch: UnsafeMutablePointer<UInt8>) throws(XZBlockFailure) -> XZBlockHeader {
        guard case .success(let n) = Syscall.preadFully(fd, scratch, 1, block.compressedOffset) else {
            throw .unreadable("cannot read its block header")
        }
        // lzma_block_header_size_decode(), a macro Swift cannot import.
        let headerSize = (UInt32(scratch[0]) + 1) * 4
        guard n == 1, scratch[0] != 0, UInt64(headerSize) < block.totalSize,
              case .success(Int(headerSize)) = Syscall.preadFully(fd, scratch, Int(headerSize), block.compressedOffset) else {
            throw .corrupt("its block header is damaged")
        }
        let filters = UnsafeMutablePointer<lzma_filter>.allocate(capacity: 5)
        filters.initialize(repeating: lzma_filter(id: UInt64.max, options: nil), count: 5)
        var options = lzma_block()
        // Version 1: the first with `ignore_check`.
        options.version = 1
        options.header_size = headerSize
        options.check = lzma_check(rawValue: block.check)
        options.filters = filters
        let rc = lzma_block_header_decode(&options, nil, scratch)
        // From here on the filters hold options liblzma allocated (none when it failed).
        let header = XZBlockHeader(filters: filters, options: options)
        guard rc == LZMA_OK else {
            throw rc == LZMA_OPTIONS_ERROR ? .corrupt("its block header names options this liblzma does not support") : .corrupt("its block header is damaged")
        }
        header.options.version = 1
        // The index is the authority on sizes (the stream's CRC32 covered it): the decoder
        // then refuses a block whose data disagrees with it.
        guard lzma_block_compressed_size(&header.options, block.unpaddedSize) == LZMA_OK,
              header.options.uncompressed_size == UInt64.max || header.options.uncompressed_size == block.uncompressedSize else {
            throw .corrupt("its block header disagrees with the index")
        }
        header.options.uncompressed_size = block.uncompressedSize
        return header
    }
}

/// Why one block could not be decoded; the fill names the block and its offset around it.
enum XZBlockFailure: Error {
    case corrupt(String)
    case unreadable(String)
}
