import Logging
import NIOCore
import NIOEmbedded
@testable import provisiond
import Testing

/// The control socket's guard against clients that do not read (`UnreadOutputHandler`), on
/// NIO's embedded channel: its event loop runs scheduled tasks only when the test advances
/// its clock, so what stays scheduled after a connection is seen, not waited for.
@Suite("a control connection's unread-output guard")
struct UnreadOutputHandlerTests {
    static let stall = TimeAmount.seconds(10)

    func channel() throws -> (EmbeddedChannel, UnreadOutputHandler) {
        let handler = UnreadOutputHandler(stallTimeout: Self.stall, peer: "test", logger: Logger(label: "test"))
        let channel = EmbeddedChannel(handler: handler)
        try channel.connect(to: SocketAddress(unixDomainSocketPath: "/test")).wait()
        return (channel, handler)
    }

    func reply(_ channel: EmbeddedChannel) -> ByteBuffer { channel.allocator.buffer(string: "{\"ok\":true}\n") }

    @Test("a reply the client took leaves nothing scheduled")
    func deliveredReplyLeavesNoTimer() throws {
        let (channel, handler) = try channel()
        try channel.writeAndFlush(reply(channel)).wait()  // the embedded peer takes it at once
        #expect(try channel.readOutbound(as: ByteBuffer.self) != nil)
        #expect(!handler.isWatchingForStall, "a 10 s timer for a reply already delivered")
        #expect(try channel.finish().isClean)
    }

    @Test("a client that leaves while a reply waits leaves nothing scheduled")
    func clientLeavingCancelsTheCheck() throws {
        let (channel, handler) = try channel()
        channel.write(reply(channel), promise: nil)  // written, not flushed: it waits
        #expect(handler.isWatchingForStall)
        channel.pipeline.fireChannelInactive()
        #expect(!handler.isWatchingForStall)
        _ = try? channel.finish()
    }

    @Test("a client that takes nothing of a reply for the timeout is disconnected")
    func stalledClientIsDropped() throws {
        let (channel, handler) = try channel()
        channel.write(reply(channel), promise: nil)
        channel.embeddedEventLoop.advanceTime(by: Self.stall - .seconds(1))
        #expect(channel.isActive)
        channel.embeddedEventLoop.advanceTime(by: .seconds(1))
        #expect(!channel.isActive, "the stalled client is still connected")
        #expect(!handler.isWatchingForStall)
    }
}
