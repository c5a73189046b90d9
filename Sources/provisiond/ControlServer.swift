import ControlProtocol
import Foundation
import Logging
import NIOCore
import NIOPosix
import ProvisionCShims
import ServiceLifecycle
import Station
import Synchronization

/// The control socket (DESIGN.md §7): AF_UNIX stream, newline-delimited JSON. Bound by the
/// daemon itself, or handed over by systemd (socket activation).
struct ControlServer: Service {
    let station: Station
    let socketPath: String
    let socketGroup: String
    let configPath: String
    let notifier: SystemdNotifier
    let admission: ClientAdmission
    let logger: Logger
    let statusCache = StatusReplyCache()

    /// A connection as the accept path decided it: served, or told why not and closed.
    enum Connection: Sendable {
        case admitted(NIOAsyncChannel<ByteBuffer, ByteBuffer>, PeerCredentials?, InputEnd)
        case refused
    }

    func run() async throws {
        let systemdSocket = provision_sd_listen_fds() >= 1
        // Known before the first connection: the admission of a connection past the cap
        // depends on whether the peer is an admin.
        // systemd's socket: the group of the path it is bound to (getsockname), whatever
        // --socket says (a drop-in may move ListenStream=).
        let socketGID: gid_t = systemdSocket ? {
            var st = stat()
            return stat(boundPath(of: 3) ?? socketPath, &st) == 0 ? st.st_gid : 0
        }() : getgrnam(socketGroup)?.pointee.gr_gid ?? 0
        let policy = AccessPolicy(socketGID: socketGID, adminGID: getgrnam(await station.config.adminGroup)?.pointee.gr_gid)
        let bootstrap = ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(ChannelOptions.backlog, value: 256)
        let initializer: @Sendable (Channel) -> EventLoopFuture<Connection> = { [admission, logger] channel in
            Self.admit(channel, admission: admission, policy: policy, logger: logger)
        }
        let server: NIOAsyncChannel<Connection, Never>
        let path: String
        if systemdSocket {
            // systemd owns the socket's path and permissions (provisiond.socket).
            server = try await bootstrap.bind(NIOBSDSocket.Handle(3), childChannelInitializer: initializer)
            path = "fd 3 from systemd"
        } else {
            let dir = (socketPath as NSString).deletingLastPathComponent
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
            server = try await bootstrap.bind(unixDomainSocketPath: socketPath, cleanupExistingSocketFile: true, childChannelInitializer: initializer)
            // Reading needs the socket's group; root or the admin group may change things.
            let gid = getgrnam(socketGroup)?.pointee.gr_gid
            _ = chown(socketPath, 0, gid ?? 0)
            _ = chmod(socketPath, gid == nil ? 0o600 : 0o660)
            if gid == nil { logger.warning("group \(socketGroup) does not exist: the control socket is root-only") }
            path = socketPath
        }
        let limits = admission.limits
        logger.info("control socket listening on \(path): at most \(limits.maxClients) clients (+\(ClientAdmission.adminReserve) for admins)")
        notifier.ready()

        try await withGracefulShutdownHandler {
            // Watch sessions never end by themselves: a graceful shutdown cancels them all.
            try await cancelWhenGracefulShutdown {
            try await withThrowingDiscardingTaskGroup { group in
                try await server.executeThenClose { inbound in
                    for try await connection in inbound.cancelOnGracefulShutdown() {
                        guard case .admitted(let channel, let peer, let inputEnd) = connection else { continue }
                        group.addTask {
                            let session = ControlSession(station: station, configPath: configPath, policy: policy,
                                                         admission: admission, statusCache: statusCache, logger: logger)
                            await session.serve(channel, peer: peer, inputEnd: inputEnd)
                        }
                    }
                }
            }
            }
        } onGracefulShutdown: {
            if !systemdSocket { unlink(socketPath) }
        }
    }

    /// Runs on the connection's event loop as it is accepted, before any task or buffer
    /// exists for it: counts it against the cap, and either sets up its pipeline (small send
    /// buffer, the unread-output watch, a small inbound buffer) or gives it the refusal.
    static func admit(_ channel: Channel, admission: ClientAdmission, policy: AccessPolicy, logger: Logger) -> EventLoopFuture<Connection> {
        let credentials: EventLoopFuture<PeerCredentials?>
        if let provider = channel as? SocketOptionProvider {
            // struct ucred { pid_t pid; uid_t uid; gid_t gid; } — three 32-bit fields.
            credentials = provider.unsafeGetSocketOption(level: NIOBSDSocket.OptionLevel(rawValue: SOL_SOCKET),
                                                         name: NIOBSDSocket.Option(rawValue: 17 /* SO_PEERCRED */))
                .map { (cred: PeerCredentials) -> PeerCredentials? in cred }
                .recover { _ in nil }
        } else {
            credentials = channel.eventLoop.makeSucceededFuture(nil)
        }
        return credentials.flatMapThrowing { peer -> Connection in
            if let reason = admission.admit(isAdmin: { peer.map(policy.accessLevel) == .admin }) {
                try channel.pipeline.syncOperations.addHandler(RefusalHandler(reason: reason))
                return .refused
            }
            channel.closeFuture.whenComplete { _ in admission.release() }
            // A small send buffer: a client that does not read makes the daemon answer only as
            // many requests as fit (2–3 status replies; the kernel doubles the value) before its
            // session parks. 200 such clients at 32 KiB each took ~8,000 replies' work together
            // and held a status from another client up for 2 s (benchmarks/clients.sh); a client
            // that reads drains a local socket at once whatever the size.
            try channel.syncOptions?.setOption(ChannelOptions.socketOption(.so_sndbuf), value: 4 << 10)
            let who = peer.map { "pid \($0.pid) uid \($0.uid)" } ?? "(unknown peer)"
            let stall = TimeAmount.seconds(Int64(admission.limits.unreadOutputTimeout))
            try channel.pipeline.syncOperations.addHandler(UnreadOutputHandler(stallTimeout: stall, peer: who, logger: logger))
            // A client that shuts down its writing side after its request (`nc -N`, socat, a
            // scraper's bridge) still gets its answers: its end of input ends the session only
            // after the lines before it are answered, and ends a watch at once.
            try channel.syncOptions?.setOption(ChannelOptions.allowRemoteHalfClosure, value: true)
            let inputEnd = InputEnd()
            try channel.pipeline.syncOperations.addHandler(InputEndHandler(inputEnd))
            // A connection that asks nothing is closed after a while: idle clients held slots
            // for ever, and enough of them shut the board and the scrapers out.
            try channel.pipeline.syncOperations.addHandler(IdleClientHandler(timeout: .seconds(Int64(admission.limits.idleTimeout)),
                                                                              inputEnd: inputEnd, peer: who, logger: logger))
            // Requests are split into lines by the session (LineFramer), one at a time: two
            // chunks read ahead are plenty.
            let configuration = NIOAsyncChannel<ByteBuffer, ByteBuffer>.Configuration(backPressureStrategy: .init(lowWatermark: 1, highWatermark: 2))
            return .admitted(try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel, configuration: configuration), peer, inputEnd)
        }
    }
}

/// Who is on the other end, from SO_PEERCRED (the kernel's word, not the client's).
struct PeerCredentials: Sendable {
    var pid: Int32
    var uid: UInt32
    var gid: UInt32

    /// The peer's groups: from the peer process itself (/proc/PID/status, exact even for a
    /// process started with extra groups), else from the user database (under the unit's
    /// ProtectProc=invisible other users' /proc entries are hidden).
    var groups: [gid_t] {
        if let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
           let line = text.split(separator: "\n").first(where: { $0.hasPrefix("Groups:") }) {
            return [gid] + line.dropFirst(7).split(separator: " ").compactMap { gid_t($0.trimmingCharacters(in: .whitespaces)) }
        }
        guard let pw = getpwuid(uid) else { return [gid] }
        var count: Int32 = 64
        var list = [gid_t](repeating: 0, count: 64)
        guard getgrouplist(pw.pointee.pw_name, gid, &list, &count) >= 0 else { return [gid] }
        return Array(list.prefix(Int(count)))
    }
}

enum Access: String { case none, read, admin }

/// Who may do what on the socket: the socket's group reads, root and the admin group change.
struct AccessPolicy: Sendable {
    let socketGID: gid_t
    let adminGID: gid_t?

    func accessLevel(_ peer: PeerCredentials) -> Access {
        if peer.uid == 0 { return .admin }
        let groups = peer.groups
        if let adminGID, groups.contains(adminGID) { return .admin }
        if groups.contains(socketGID) { return .read }
        return .none
    }
}

struct ControlSession {
    let station: Station
    let configPath: String
    let policy: AccessPolicy
    let admission: ClientAdmission
    let statusCache: StatusReplyCache
    let logger: Logger

    func serve(_ connection: NIOAsyncChannel<ByteBuffer, ByteBuffer>, peer: PeerCredentials?, inputEnd: InputEnd) async {
        let access = peer.map(policy.accessLevel) ?? .none
        do {
            // Replies go straight to the channel, one at a time, each awaited until the kernel
            // took it: a connection never holds more than one reply, and a client that does
            // not read parks only its own session until UnreadOutputHandler drops it. (The
            // async writer's own backpressure reacts late: a session that answers from the
            // status cache outran it by hundreds of KB.)
            let channel = connection.channel
            try await connection.executeThenClose { inbound, _ in
                func send(_ message: ServerMessage) async throws {
                    try await channel.writeAndFlush(ByteBuffer(bytes: try LineCodec.encode(message)))
                }
                // The name from the admission (no trip through the station actor, which a
                // crowd of clients keeps busy): every connection gets its hello at once.
                try await send(ServerMessage(hello: Hello(daemon: "provisiond", station: admission.stationName, access: access.rawValue)))
                var framer = LineFramer()
                for try await var chunk in inbound {
                    framer.append(&chunk)
                    while let frame = framer.next() {
                        // A request being answered is not idleness, however long it takes (a
                        // reload that decompresses images, a lab read behind a lock).
                        inputEnd.answering(true)
                        let goesOn = try await respond(to: frame, access: access, peer: peer, channel: channel, inputEnd: inputEnd, send: send)
                        inputEnd.answering(false)
                        guard goesOn else { return }
                    }
                }
            }
        } catch {
            logger.debug("control connection ended: \(error)")
        }
    }

    /// Answers one request line; false when the connection ends with it (an overlong line,
    /// or a `watch` that has ended).
    func respond(to frame: Frame, access: Access, peer: PeerCredentials?, channel: Channel, inputEnd: InputEnd,
                 send: (ServerMessage) async throws -> Void) async throws -> Bool {
        guard case .line(let buffer) = frame else {
            try await send(ServerMessage(id: nil, error: ErrorPayload(.badRequest, "request line longer than \(ControlProtocol.maxLineLength) bytes")))
            return false
        }
        if buffer.readableBytes == 0 { return true }
        let request: Request
        do {
            request = try LineCodec.decode(Request.self, from: Data(buffer.readableBytesView))
        } catch {
            try await send(ServerMessage(id: nil, error: ErrorPayload(.badRequest, "malformed request: not a JSON object with id and method (\(error))")))
            return true
        }
        guard let method = Method(rawValue: request.method) else {
            try await send(ServerMessage(id: request.id, error: ErrorPayload(.unknownMethod, "unknown method \"\(request.method)\"; known: \(Method.allCases.map(\.rawValue).joined(separator: ", "))")))
            return true
        }
        if let refusal = authorize(method, access: access, peer: peer) {
            try await send(ServerMessage(id: request.id, error: refusal))
            return true
        }
        if method == .watch {
            // Subscribed before the status is taken: a change in between is
            // delivered (perhaps twice), never missed.
            let events = await station.subscribe()
            try await send(ServerMessage(id: request.id, result: ResultPayload(status: await station.status())))
            // From here the client's end of input is the end of the watch (closeFuture below).
            if inputEnd.watchStarts() { channel.close(promise: nil) }
            try await streamEvents(events, request: request.id, channel: channel, admin: access == .admin)
            return false
        }
        if method == .status {
            try await channel.writeAndFlush(try await statusCache.reply(id: request.id, station: station))
            return true
        }
        do {
            let result = try await handle(method, request.params ?? .init(), peer: peer)
            try await send(ServerMessage(id: request.id, result: result))
        } catch let error as ErrorPayload {
            try await send(ServerMessage(id: request.id, error: error))
        } catch {
            try await send(ServerMessage(id: request.id, error: ErrorPayload(.internalError, "\(error)")))
        }
        return true
    }

    /// Streams events until the client goes away. The inbound stream already has its one
    /// iterator (the request loop), so the end is seen through the channel's close future.
    ///
    /// Each event is written once the kernel took the one before, so a slow watcher's backlog
    /// stays in its subscription, where progress is coalesced. A watcher too slow even for
    /// the state changes is told so and disconnected: it never gets a stream with a silent
    /// hole in it.
    func streamEvents(_ events: EventSubscription, request: Int, channel: Channel, admin: Bool) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                for await var event in events {
                    // Generated passwords are for admins' eyes only.
                    if !admin, let users = event.job?.users { event.job?.users = users.map(\.redacted) }
                    try await channel.writeAndFlush(ByteBuffer(bytes: try LineCodec.encode(event: event)))
                }
                guard events.overflowed else { return }
                logger.notice("a watch client fell \(events.backlogLimit) state changes behind: told and disconnected")
                let notice = ServerMessage(id: request, error: ErrorPayload(.tooSlow,
                    "watch ended: this client fell \(events.backlogLimit) state changes behind (it reads too slowly), so later events were not sent; run `provision status` and watch again"))
                // Returning closes the channel: the notice must have reached the client first.
                try await channel.writeAndFlush(ByteBuffer(bytes: try LineCodec.encode(notice)))
            }
            group.addTask {
                // The client closing its end ends the watch.
                // So does the daemon's shutdown: this task is cancelled then, but a future's
                // get() does not notice cancellation, and a watcher that never hangs up (the
                // web board) would hold the stop until systemd's SIGKILL.
                try await withTaskCancellationHandler {
                    try await channel.closeFuture.get()
                } onCancel: {
                    channel.close(promise: nil)
                }
            }
            try await group.next()
            group.cancelAll()
        }
    }

    func authorize(_ method: Method, access: Access, peer: PeerCredentials?) -> ErrorPayload? {
        let who = peer.map { "uid \($0.uid)" } ?? "unknown peer"
        switch (method.changesState, access) {
        case (_, .admin), (false, .read): return nil
        case (true, _):
            return ErrorPayload(.permissionDenied, "\(method.rawValue) changes the station: only root or members of the admin group may call it (\(who) may not)")
        case (false, _):
            return ErrorPayload(.permissionDenied, "\(who) is not in the control socket's group")
        }
    }

    func handle(_ method: Method, _ p: Request.Params, peer: PeerCredentials?) async throws -> ResultPayload {
        switch method {
        case .status:
            return ResultPayload(status: await station.status())
        case .devices:
            return ResultPayload(devices: await station.deviceList())
        case .metrics:
            return ResultPayload(metrics: await station.metricsText())
        case .jobs:
            try checkJobState(p.state)
            return ResultPayload(jobs: try await station.jobs(.init(state: p.state, slot: p.slot, device: p.device, limit: p.limit ?? 50)))
        case .flash:
            guard let device = p.device else { throw ErrorPayload(.badRequest, "flash needs params.device") }
            let job = try await station.flash(device: device, profileName: p.profile, image: p.image)
            logger.notice("manual flash by uid \(peer?.uid ?? 0): job \(job.id) on \(device)", metadata: ["job": "\(job.id)", "device": "\(device)"])
            return ResultPayload(job: job)
        case .cancel:
            guard let id = p.job else { throw ErrorPayload(.badRequest, "cancel needs params.job") }
            return ResultPayload(job: try await station.cancel(job: id), message: "cancelling job \(id)")
        case .reload:
            switch await reload(station: station, configPath: configPath, admission: admission, logger: logger) {
            case .success(let (c, kept)):
                return ResultPayload(message: "reloaded \(c.file): \(c.slots.count) slot(s), \(c.profiles.count) profile(s)" + Station.restartNote(kept))
            case .failure(let e): throw ErrorPayload(.badRequest, "reload failed, the running configuration stays: \(e)")
            }
        case .cards:
            return ResultPayload(cards: try await station.cards())
        case .forgetCard:
            guard let card = p.card else { throw ErrorPayload(.badRequest, "forget-card needs params.card") }
            guard try await station.forgetCard(card) else { throw ErrorPayload(.notFound, "no card \(card) is remembered (see provision cards)") }
            logger.notice("card \(card) forgotten by uid \(peer?.uid ?? 0): it is no longer refused", metadata: ["card": "\(card)"])
            return ResultPayload(message: "card \(card) forgotten: it is no longer refused")
        case .labStatus:
            return ResultPayload(lab: try await labCall { try await station.labStatus() })
        case .labJobs:
            try checkJobState(p.state)
            return ResultPayload(jobs: try await labCall { try await station.labJobs(station: p.station, state: p.state, slot: p.slot, limit: p.limit ?? 50) })
        case .watch:
            throw ErrorPayload(.internalError, "watch is handled by the session")
        }
    }
}

/// The `status` reply, encoded once per station change. `status` is what monitoring and a
/// pipelining client ask for most; encoding it is most of its cost (~2 ms in a debug build
/// on a busy 2-core machine, for a 3 KB reply), and 200 clients asking for it back to back
/// kept every other client waiting for hundreds of milliseconds. The station's event count
/// says when the cached result is stale: every change to what `status` shows is announced.
actor StatusReplyCache {
    private var cached: (generation: Int, result: [UInt8])?
    /// One encoding at a time: a crowd of clients asking at once waits for the same one.
    private var pending: (generation: Int, task: Task<[UInt8], Error>)?

    func result(station: Station) async throws -> [UInt8] {
        let generation = station.eventGeneration
        if let cached, cached.generation == generation { return cached.result }
        if let pending, pending.generation == generation { return try await pending.task.value }
        let task = Task { Array(try LineCodec.encode(ResultPayload(status: await station.status())).dropLast()) }
        pending = (generation, task)
        defer { if pending?.generation == generation { pending = nil } }
        let result = try await task.value
        if (cached?.generation ?? .min) < generation { cached = (generation, result) }
        return result
    }

    /// `{"id":ID,"ok":true,"result":{…}}` and a newline: what LineCodec makes of
    /// `ServerMessage(id:result:)` (sorted keys), with the result reused.
    nonisolated func reply(id: Int, station: Station) async throws -> ByteBuffer {
        let result = try await self.result(station: station)
        let head = Array("{\"id\":\(id),\"ok\":true,\"result\":".utf8)
        var buffer = ByteBuffer()
        buffer.reserveCapacity(head.count + result.count + 2)
        buffer.writeBytes(head)
        buffer.writeBytes(result)
        buffer.writeBytes([UInt8(ascii: "}"), UInt8(ascii: "\n")])
        return buffer
    }
}

/// A `jobs`/`lab-jobs` filter names a state that exists.
func checkJobState(_ state: String?) throws(ErrorPayload) {
    if let state, JobState(rawValue: state) == nil {
        throw ErrorPayload(.badRequest, "unknown job state \"\(state)\"; known: \(JobState.allCases.map(\.rawValue).joined(separator: ", "))")
    }
}

/// A lab call's errors as the wire says them (issue 18): a station without a shared ledger
/// was asked the wrong thing; a database away is a refusal, not a daemon fault.
func labCall<T: Sendable>(_ body: () async throws -> T) async throws -> T {
    do { return try await body() } catch let e as Station.NotShared {
        throw ErrorPayload(.badRequest, e.description)
    } catch let e as LinkFailure {
        throw ErrorPayload(.refused, e.message)
    }
}

/// Whether a connection's input has ended and whether it is watching: a watch is ended by the
/// end of its client's input (half-closure is allowed so that other requests are answered
/// after it), whichever of the two comes first.
final class InputEnd: Sendable {
    private let state = Mutex((inputClosed: false, watching: false, answering: false))

    /// The input ended; true: close the connection now (it is watching).
    func inputCloses() -> Bool { state.withLock { $0.inputClosed = true; return $0.watching } }

    /// A watch starts; true: close the connection now (its input has already ended).
    func watchStarts() -> Bool { state.withLock { $0.watching = true; return $0.inputClosed } }

    var isWatching: Bool { state.withLock { $0.watching } }

    /// The session is answering a request (set around each one).
    func answering(_ busy: Bool) { state.withLock { $0.answering = busy } }

    var isAnswering: Bool { state.withLock { $0.answering } }
}

/// Closes a connection that has sent no request and received no reply for `timeout`; a
/// watching one, or one whose request is still being answered, is never idle. One timer per
/// connection, armed when it opens and again only when it fires (activity is a timestamp, not
/// a new timer per line), and cancelled with the connection: a short-lived client leaves
/// nothing to wake the daemon later.
final class IdleClientHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let timeout: TimeAmount
    let inputEnd: InputEnd
    let peer: String
    let logger: Logger
    private var lastActivity = NIODeadline.now()
    private var timer: Scheduled<Void>?

    init(timeout: TimeAmount, inputEnd: InputEnd, peer: String, logger: Logger) {
        self.timeout = timeout
        self.inputEnd = inputEnd
        self.peer = peer
        self.logger = logger
    }

    func handlerAdded(context: ChannelHandlerContext) {
        lastActivity = .now()
        arm(context, at: lastActivity + timeout)
    }

    func handlerRemoved(context: ChannelHandlerContext) { cancel() }

    func channelInactive(context: ChannelHandlerContext) {
        cancel()
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        lastActivity = .now()
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        lastActivity = .now()
        context.write(data, promise: promise)
    }

    private func arm(_ context: ChannelHandlerContext, at deadline: NIODeadline) {
        let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
        timer = context.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) { [self] in
            let context = loopBound.value
            timer = nil
            guard !inputEnd.isWatching else { return }
            // A request still being answered: looked at again a timeout later.
            let due = inputEnd.isAnswering ? .now() + timeout : lastActivity + timeout
            if due > .now() { return arm(context, at: due) }
            logger.debug("closing a control connection idle for \(timeout.nanoseconds / 1_000_000_000) s (\(peer)): idle_client_timeout")
            context.close(promise: nil)
        }
    }

    private func cancel() {
        timer?.cancel()
        timer = nil
    }
}

/// Tells `InputEnd` when the client's input ends, and closes a watching connection then.
/// The event goes on to the session's inbound stream, which ends with it.
final class InputEndHandler: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    private let inputEnd: InputEnd

    init(_ inputEnd: InputEnd) { self.inputEnd = inputEnd }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed, inputEnd.inputCloses() {
            context.close(promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }
}

/// The filesystem path a Unix socket is bound to; nil for another kind of socket, an
/// unbound or abstract one.
func boundPath(of fd: Int32) -> String? {
    var address = sockaddr_un()
    var length = socklen_t(MemoryLayout<sockaddr_un>.size)
    let rc = withUnsafeMutablePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
    }
    guard rc == 0, address.sun_family == sa_family_t(AF_UNIX) else { return nil }
    let pathBytes = max(0, Int(length) - MemoryLayout<sa_family_t>.size)
    return withUnsafeBytes(of: address.sun_path) { raw -> String? in
        let bytes = raw.prefix(pathBytes).prefix { $0 != 0 }
        return bytes.isEmpty ? nil : String(decoding: bytes, as: UTF8.self)
    }
}
