import ControlProtocol
import Foundation
import Logging
import NIOCore
import NIOPosix
import ProvisionCShims
import ServiceLifecycle
import Station

/// The control socket (DESIGN.md §7): AF_UNIX stream, newline-delimited JSON. Bound by the
/// daemon itself, or handed over by systemd (socket activation).
struct ControlServer: Service {
    let station: Station
    let socketPath: String
    let socketGroup: String
    let configPath: String
    let notifier: SystemdNotifier
    let logger: Logger

    func run() async throws {
        let bootstrap = ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(ChannelOptions.backlog, value: 64)
        let initializer: @Sendable (Channel) -> EventLoopFuture<NIOAsyncChannel<Frame, ByteBuffer>> = { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(LineFrameDecoder()))
                return try NIOAsyncChannel<Frame, ByteBuffer>(wrappingChannelSynchronously: channel)
            }
        }
        let server: NIOAsyncChannel<NIOAsyncChannel<Frame, ByteBuffer>, Never>
        let path: String
        if provision_sd_listen_fds() >= 1 {
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
        let socketGID: gid_t = {
            var st = stat()
            return stat(socketPath, &st) == 0 ? st.st_gid : 0
        }()
        let adminGID = getgrnam(await station.config.adminGroup)?.pointee.gr_gid
        logger.info("control socket listening on \(path)")
        notifier.ready()

        try await withGracefulShutdownHandler {
            // Watch sessions never end by themselves: a graceful shutdown cancels them all.
            try await cancelWhenGracefulShutdown {
            try await withThrowingDiscardingTaskGroup { group in
                try await server.executeThenClose { inbound in
                    for try await connection in inbound.cancelOnGracefulShutdown() {
                        group.addTask {
                            let session = ControlSession(station: station, configPath: configPath, socketGID: socketGID, adminGID: adminGID, logger: logger)
                            await session.serve(connection)
                        }
                    }
                }
            }
            }
        } onGracefulShutdown: {
            if provision_sd_listen_fds() < 1 { unlink(socketPath) }
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

struct ControlSession {
    let station: Station
    let configPath: String
    let socketGID: gid_t
    let adminGID: gid_t?
    let logger: Logger

    func serve(_ connection: NIOAsyncChannel<Frame, ByteBuffer>) async {
        let peer = try? await peerCredentials(connection.channel)
        let access = peer.map(accessLevel) ?? .none
        do {
            try await connection.executeThenClose { inbound, outbound in
                func send(_ message: ServerMessage) async throws {
                    try await outbound.write(ByteBuffer(bytes: try LineCodec.encode(message)))
                }
                try await send(ServerMessage(hello: Hello(daemon: "provisiond", station: await station.config.name, access: access.rawValue)))
                for try await frame in inbound {
                    guard case .line(let buffer) = frame else {
                        try await send(ServerMessage(id: nil, error: ErrorPayload(.badRequest, "request line longer than \(ControlProtocol.maxLineLength) bytes")))
                        return
                    }
                    if buffer.readableBytes == 0 { continue }
                    let request: Request
                    do {
                        request = try LineCodec.decode(Request.self, from: Data(buffer.readableBytesView))
                    } catch {
                        try await send(ServerMessage(id: nil, error: ErrorPayload(.badRequest, "malformed request: not a JSON object with id and method (\(error))")))
                        continue
                    }
                    guard let method = Method(rawValue: request.method) else {
                        try await send(ServerMessage(id: request.id, error: ErrorPayload(.unknownMethod, "unknown method \"\(request.method)\"; known: \(Method.allCases.map(\.rawValue).joined(separator: ", "))")))
                        continue
                    }
                    if let refusal = authorize(method, access: access, peer: peer) {
                        try await send(ServerMessage(id: request.id, error: refusal))
                        continue
                    }
                    if method == .watch {
                        try await send(ServerMessage(id: request.id, result: ResultPayload(status: await station.status())))
                        try await streamEvents(to: outbound, until: connection.channel, admin: access == .admin)
                        return
                    }
                    do {
                        let result = try await handle(method, request.params ?? .init(), peer: peer)
                        try await send(ServerMessage(id: request.id, result: result))
                    } catch let error as ErrorPayload {
                        try await send(ServerMessage(id: request.id, error: error))
                    } catch {
                        try await send(ServerMessage(id: request.id, error: ErrorPayload(.internalError, "\(error)")))
                    }
                }
            }
        } catch {
            logger.debug("control connection ended: \(error)")
        }
    }

    /// Streams events until the client goes away. The inbound stream already has its one
    /// iterator (the request loop), so the end is seen through the channel's close future.
    func streamEvents(to outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>, until channel: any Channel, admin: Bool) async throws {
        let events = await station.subscribe()
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                for await var event in events {
                    // Generated passwords are for admins' eyes only.
                    if !admin, let users = event.job?.users { event.job?.users = users.map(\.redacted) }
                    try await outbound.write(ByteBuffer(bytes: try LineCodec.encode(ServerMessage(event: event))))
                }
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

    func accessLevel(_ peer: PeerCredentials) -> Access {
        if peer.uid == 0 { return .admin }
        let groups = peer.groups
        if let adminGID, groups.contains(adminGID) { return .admin }
        if groups.contains(socketGID) { return .read }
        return .none
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
        case .jobs:
            if let s = p.state, JobState(rawValue: s) == nil {
                throw ErrorPayload(.badRequest, "unknown job state \"\(s)\"; known: \(JobState.allCases.map(\.rawValue).joined(separator: ", "))")
            }
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
            switch await reload(station: station, configPath: configPath, logger: logger) {
            case .success(let c): return ResultPayload(message: "reloaded \(c.file): \(c.slots.count) slot(s), \(c.profiles.count) profile(s)")
            case .failure(let e): throw ErrorPayload(.badRequest, "reload failed, the running configuration stays: \(e)")
            }
        case .cards:
            return ResultPayload(cards: try await station.cards())
        case .forgetCard:
            guard let card = p.card else { throw ErrorPayload(.badRequest, "forget-card needs params.card") }
            guard try await station.forgetCard(card) else { throw ErrorPayload(.notFound, "no card \(card) is remembered (see provision cards)") }
            logger.notice("card \(card) forgotten by uid \(peer?.uid ?? 0): it is no longer refused", metadata: ["card": "\(card)"])
            return ResultPayload(message: "card \(card) forgotten: it is no longer refused")
        case .watch:
            throw ErrorPayload(.internalError, "watch is handled by the session")
        }
    }

    func peerCredentials(_ channel: Channel) async throws -> PeerCredentials? {
        guard let provider = channel as? SocketOptionProvider else { return nil }
        // struct ucred { pid_t pid; uid_t uid; gid_t gid; } — three 32-bit fields.
        let cred: PeerCredentials = try await provider.unsafeGetSocketOption(
            level: NIOBSDSocket.OptionLevel(rawValue: SOL_SOCKET), name: NIOBSDSocket.Option(rawValue: 17 /* SO_PEERCRED */)).get()
        return cred
    }
}
