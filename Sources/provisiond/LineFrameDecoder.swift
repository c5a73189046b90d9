import ControlProtocol
import NIOCore

/// Splits the byte stream into lines. A line longer than the protocol allows becomes one
/// `.tooLong` frame (the connection then gets an error and is closed) instead of growing a
/// buffer without bound: a client must not be able to take the daemon's memory.
enum Frame: Sendable {
    case line(ByteBuffer)
    case tooLong
}

struct LineFrameDecoder: ByteToMessageDecoder {
    typealias InboundOut = Frame
    let maxLength: Int
    private var discarding = false

    init(maxLength: Int = ControlProtocol.maxLineLength) { self.maxLength = maxLength }

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        let view = buffer.readableBytesView
        if let newline = view.firstIndex(of: UInt8(ascii: "\n")) {
            let length = newline - view.startIndex
            if discarding {
                buffer.moveReaderIndex(forwardBy: length + 1)
                discarding = false
                return .continue
            }
            let line = buffer.readSlice(length: length)!
            buffer.moveReaderIndex(forwardBy: 1)
            context.fireChannelRead(wrapInboundOut(.line(line)))
            return .continue
        }
        if buffer.readableBytes > maxLength {
            buffer.moveReaderIndex(forwardBy: buffer.readableBytes)
            if !discarding {
                discarding = true
                context.fireChannelRead(wrapInboundOut(.tooLong))
            }
            return .continue
        }
        return .needMoreData
    }
}
