#if canImport(Glibc)
import Glibc
#endif
import ControlProtocol
import Foundation
import Logging
import NIOCore
import ProvisionCShims
import Station
import Synchronization

/// How many control-socket clients the daemon serves, decided when a connection is
/// accepted, before any task or buffer exists for it.
///
/// Why a cap at all: every connection is a descriptor, and descriptors are what a card's
/// job needs (the device, the image, the cache file, e2fsck's pipes) and what libudev needs
/// to hand over an event. With no cap, ~1,000 idle connections filled the table and a card
/// inserted then got no job, no refusal and no log line. So the cap is also kept under the
/// descriptor limit with room for the cards (`DescriptorBudget`), whatever max_clients says.
///
/// Admins (root, the admin group) get `adminReserve` connections beyond the cap, as
/// PostgreSQL keeps connections for superusers: an operator can still see `status` and
/// `cancel` a job while the socket's group has taken every connection.
final class ClientAdmission: Sendable {
    static let adminReserve = 8

    struct Limits: Sendable, Equatable {
        /// Connections anyone in the socket's group may hold (after the descriptor clamp).
        var maxClients: Int
        /// How long a client may leave output unread (`unread_output_timeout`).
        var unreadOutputTimeout: Int
        /// How long a client may hold a connection without a request (`idle_client_timeout`).
        var idleTimeout: Int = 60
        /// The config file, named in refusals.
        var configFile: String
    }

    private struct State {
        var limits: Limits
        var stationName: String
        var open = 0
        var refusing = false
        var refusedSinceNotice = 0
        /// Most connections open since memory was last handed back.
        var peakSinceTrim = 0
    }

    private let state: Mutex<State>
    private let logger: Logger
    /// RLIMIT_NOFILE's soft limit, after `DescriptorBudget.raiseSoftLimit`.
    let descriptorLimit: Int

    init(config: StationConfig, descriptorLimit: Int, logger: Logger) {
        self.descriptorLimit = descriptorLimit
        self.logger = logger
        state = Mutex(State(limits: DescriptorBudget.clientLimits(config, descriptorLimit: descriptorLimit, logger: logger), stationName: config.name))
    }

    var limits: Limits { state.withLock { $0.limits } }
    /// For the hello.
    var stationName: String { state.withLock { $0.stationName } }
    var openConnections: Int { state.withLock { $0.open } }

    /// A reloaded config's limits, for connections accepted from now on.
    func apply(_ config: StationConfig) {
        let limits = DescriptorBudget.clientLimits(config, descriptorLimit: descriptorLimit, logger: logger)
        state.withLock { $0.limits = limits; $0.stationName = config.name }
    }

    /// Admits a connection or returns the reason to give it. `isAdmin` is asked only when the
    /// general cap is reached (it reads /proc), and outside the lock.
    func admit(isAdmin: () -> Bool) -> String? {
        if state.withLock({ s in
            guard s.open < s.limits.maxClients else { return false }
            s.open += 1
            s.peakSinceTrim = max(s.peakSinceTrim, s.open)
            return true
        }) { return nil }
        let admin = isAdmin()
        let (refusal, notice): (String?, String?) = state.withLock { s in
            if admin && s.open < s.limits.maxClients + Self.adminReserve {
                s.open += 1
                s.peakSinceTrim = max(s.peakSinceTrim, s.open)
                return (nil, nil)
            }
            var notice: String?
            if !s.refusing {
                s.refusing = true
                notice = "control socket full: \(s.open) clients (max_clients \(s.limits.maxClients), \(Self.adminReserve) more for admins); refusing new ones until some leave"
            }
            s.refusedSinceNotice += 1
            let why = admin
                ? "provisiond is serving \(s.open) clients, its limit (max_clients \(s.limits.maxClients) in \(s.limits.configFile)) and the \(Self.adminReserve) connections kept for admins are all taken"
                : "provisiond is serving its limit of \(s.limits.maxClients) clients (max_clients in \(s.limits.configFile))"
            return (why + ": try again later", notice)
        }
        if let notice { logger.warning("\(notice)") }
        return refusal
    }

    func release() {
        let (notice, trim): (String?, Bool) = state.withLock { s in
            s.open -= 1
            // After a wave of clients has gone (64 fewer than the peak, or all of them), the
            // memory they used is handed back: glibc keeps what the event-loop threads freed
            // in their arenas, and 1,300 clients left ~60 MB of RSS behind without this.
            let trim = s.peakSinceTrim - s.open >= 64 || (s.open == 0 && s.peakSinceTrim >= 8)
            if trim { s.peakSinceTrim = s.open }
            guard s.refusing, s.open < s.limits.maxClients else { return (nil, trim) }
            s.refusing = false
            defer { s.refusedSinceNotice = 0 }
            return ("control socket accepting clients again (\(s.open) open); \(s.refusedSinceNotice) refused meanwhile", trim)
        }
        if let notice { logger.notice("\(notice)") }
        // Off the event loop (trimming a large heap takes milliseconds), and a moment later:
        // a closed connection's session task and buffers are freed just after its close.
        if trim { DispatchQueue.global(qos: .utility).asyncAfter(deadline: .now() + 0.5) { _ = provision_malloc_trim() } }
    }
}

/// Descriptors: the soft limit raised to the hard one at start (systemd's default soft limit
/// is 1024, its hard one far higher), and a share of them kept away from clients.
enum DescriptorBudget {
    /// Descriptors kept for everything but control clients: the udev monitor, the ledger,
    /// the journal, NIO's epoll and wakeups, and for every card a job's device, image, cache
    /// file, ext2 handle and e2fsck's pipes (~20, measured with `ls /proc/PID/fd` during a
    /// provisioning job), with room to spare.
    static func reserved(slots: Int) -> Int { 128 + 32 * max(slots, 4) }

    /// Raises RLIMIT_NOFILE's soft limit to the hard limit; returns the soft limit in force.
    static func raiseSoftLimit() -> Int {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return 1024 }
        if limit.rlim_cur < limit.rlim_max {
            var raised = limit
            raised.rlim_cur = limit.rlim_max
            if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &raised) == 0 { limit = raised }
        }
        return limit.rlim_cur >= rlim_t(Int32.max) ? Int(Int32.max) : Int(limit.rlim_cur)
    }

    /// The client cap that fits: max_clients, unless the descriptor limit leaves less room
    /// once the reserve and the admins' connections are kept (then a warning says so).
    static func clientLimits(_ config: StationConfig, descriptorLimit: Int, logger: Logger) -> ClientAdmission.Limits {
        let reserve = reserved(slots: config.slots.count)
        let room = descriptorLimit - reserve - ClientAdmission.adminReserve
        var cap = config.maxClients
        if room < cap {
            cap = max(1, room)
            logger.warning("max_clients \(config.maxClients) does not fit the descriptor limit \(descriptorLimit) (RLIMIT_NOFILE) with \(reserve) kept for udev and the cards: serving at most \(cap) clients; raise LimitNOFILE= to serve more")
        }
        return .init(maxClients: cap, unreadOutputTimeout: config.unreadOutputTimeout, idleTimeout: config.idleClientTimeout, configFile: config.file)
    }
}

/// Drops a client that does not read. Sessions write one message at a time and wait until
/// the kernel has taken it (see `ControlSession.send`), so a connection never holds more
/// than the message being sent; a client that takes nothing of it for `stallTimeout` is
/// disconnected, and its session, buffers and descriptor are freed. Without this, 200
/// clients pipelining `status` without reading grew the daemon by hundreds of MB that it
/// never gave back, and parked their sessions forever.
final class UnreadOutputHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let stallTimeout: TimeAmount
    let peer: String
    let logger: Logger
    private var unsent = 0
    private var delivered = 0
    private var stallCheck: Scheduled<Void>?

    /// `stallTimeout`: the config's `unread_output_timeout` (its default, 10 s, is long enough
    /// for any client that reads at all and short enough that parked clients do not pile up).
    init(stallTimeout: TimeAmount, peer: String, logger: Logger) {
        self.stallTimeout = stallTimeout
        self.peer = peer
        self.logger = logger
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let bytes = unwrapOutboundIn(data).readableBytes
        unsent += bytes
        let written = promise ?? context.eventLoop.makePromise(of: Void.self)
        written.futureResult.assumeIsolated().whenComplete { [self] result in
            unsent -= bytes
            if case .success = result { delivered += bytes }
            // Nothing waits: no reason to wake in `stallTimeout`, nor to keep this connection
            // (handler, context, pipeline) alive until then. Left armed, every reply of every
            // short-lived client woke an event loop 10 s later: the idle daemon after
            // `benchmarks/daemon.sh`'s 600 status calls woke ~8 times a second.
            if unsent == 0 { disarmStallCheck() }
        }
        context.write(data, promise: written)
        armStallCheck(context: context)
    }

    /// The connection is over, whoever closed it (closing also fails the writes still
    /// pending, which disarms the check above): nothing is left to wait for.
    func channelInactive(context: ChannelHandlerContext) {
        disarmStallCheck()
        context.fireChannelInactive()
    }

    /// Whether a stall check is scheduled (for the tests).
    var isWatchingForStall: Bool { stallCheck != nil }

    private func disarmStallCheck() {
        stallCheck?.cancel()
        stallCheck = nil
    }

    /// While output waits, the client must take some of it every `stallTimeout`.
    private func armStallCheck(context: ChannelHandlerContext) {
        guard stallCheck == nil, unsent > 0 else { return }
        let mark = delivered
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        stallCheck = context.eventLoop.assumeIsolated().scheduleTask(in: stallTimeout) { [self] in
            stallCheck = nil
            let context = bound.value
            guard context.channel.isActive, unsent > 0 else { return }
            if delivered == mark {
                logger.notice("control client \(peer) does not read its replies: \(unsent) bytes unsent for \(stallTimeout.nanoseconds / 1_000_000_000) s (unread_output_timeout); disconnected")
                context.close(promise: nil)
            } else {
                armStallCheck(context: context)
            }
        }
    }
}

/// Tells a connection past the cap why it is refused, then closes it. The line fits the
/// socket's buffer, so it is delivered even though the client has not read yet.
final class RefusalHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let line: ByteBuffer

    init(reason: String) {
        let message = ServerMessage(id: nil, error: ErrorPayload(.refused, reason))
        line = ByteBuffer(bytes: (try? LineCodec.encode(message)) ?? Data("{\"ok\":false}\n".utf8))
    }

    func channelActive(context: ChannelHandlerContext) {
        context.writeAndFlush(wrapOutboundOut(line), promise: nil)
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
}
