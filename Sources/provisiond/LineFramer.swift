import ControlProtocol
import NIOCore

/// Splits a connection's bytes into request lines, in the session's own task, one line at a
/// time as the session asks for it.
///
/// Why not a ByteToMessageDecoder in the channel pipeline: it splits a whole read (up to
/// 64 KiB, ~2,000 pipelined requests) on the event loop at once, and every line becomes a
/// buffered element before the session has answered the first. 200 clients pipelining
/// `status` kept both event loops busy for half a minute that way, and no other client got
/// its hello. Here a client's unread requests stay bytes in its socket: the session reads
/// a chunk only when it has answered everything before it.
///
/// A line longer than the protocol allows becomes one `.tooLong` frame (the connection then
/// gets an error and is closed) instead of growing a buffer without bound: a client must not
/// be able to take the daemon's memory.
enum Frame: Sendable {
    case line(ByteBuffer)
    case tooLong
}

struct LineFramer {
    let maxLength: Int
    private var buffer = ByteBuffer()
    private var discarding = false

    init(maxLength: Int = ControlProtocol.maxLineLength) { self.maxLength = maxLength }

    mutating func append(_ chunk: inout ByteBuffer) {
        if buffer.readerIndex > 0 && buffer.readerIndex * 2 >= buffer.writerIndex { buffer.discardReadBytes() }
        buffer.writeBuffer(&chunk)
    }

    /// The next complete line, `.tooLong` once for a line over the limit, or nil when more
    /// bytes are needed.
    mutating func next() -> Frame? {
        while true {
            let view = buffer.readableBytesView
            if let newline = view.firstIndex(of: UInt8(ascii: "\n")) {
                let length = newline - view.startIndex
                if discarding {
                    buffer.moveReaderIndex(forwardBy: length + 1)
                    discarding = false
                    continue
                }
                // The limit holds for a line whose end has arrived too (a long line and its
                // newline in one read were answered, up to twice the limit).
                guard length <= maxLength else {
                    buffer.moveReaderIndex(forwardBy: length + 1)
                    return .tooLong
                }
                let line = buffer.readSlice(length: length)!
                buffer.moveReaderIndex(forwardBy: 1)
                return .line(line)
            }
            if buffer.readableBytes > maxLength {
                buffer.moveReaderIndex(forwardBy: buffer.readableBytes)
                if !discarding {
                    discarding = true
                    return .tooLong
                }
            }
            return nil
        }
    }
}
