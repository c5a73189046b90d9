import ControlProtocol
import Foundation
import Hummingbird
import Logging
import NIOCore
import ServiceLifecycle

/// `provision board`: one page for the bench's screen, served over HTTP, fed live by
/// server-sent events. It runs apart from provisiond (which keeps no IP socket) as a
/// read-only client of the control socket.
///
/// Routes, all GET, none taking input: `/` the page, `/board.css`, `/board.js`,
/// `/state.json` the snapshot, `/events` the snapshot stream. Any other method or path is
/// answered 404/405 without reaching the daemon: the board has nothing to forward.
public enum BoardServer {
    /// How often a page is sent a new snapshot at most. Progress events arrive several times
    /// a second per card; a wall screen does not need more than this.
    static let updateInterval: Duration = .milliseconds(250)

    /// Serves until SIGTERM or SIGINT. `ready` is told the address actually bound (the port
    /// is chosen by the kernel when `listen.port` is 0).
    public static func run(listen: ListenAddress, socketPath: String, logger: Logger = defaultLogger,
                           ready: @escaping @Sendable (String) -> Void = { _ in }) async throws {
        let hub = BoardHub()
        let feed = StationFeed(socketPath: socketPath, hub: hub, logger: logger)
        let app = Application(
            router: router(hub: hub),
            configuration: .init(address: .hostname(listen.host, port: listen.port), serverName: "provision-board",
                                 reuseAddress: true),
            services: [feed],
            onServerRunning: { channel in
                let bound = channel.localAddress.flatMap { address -> String? in
                    guard let ip = address.ipAddress, let port = address.port else { return nil }
                    return ip.contains(":") ? "[\(ip)]:\(port)" : "\(ip):\(port)"
                } ?? listen.description
                ready(bound)
            },
            logger: logger)
        try await app.runService()
    }

    /// Plain lines on stderr (the journal, under systemd); requests themselves are not logged.
    public static var defaultLogger: Logger {
        var logger = Logger(label: "provision-board")
        logger.logLevel = .info
        return logger
    }

    static func router(hub: BoardHub) -> Router<BasicRequestContext> {
        let router = Router()
        router.get("/") { _, _ in asset(PackageResources.index_html, type: "text/html; charset=utf-8") }
        router.get("/board.css") { _, _ in asset(PackageResources.board_css, type: "text/css; charset=utf-8") }
        router.get("/board.js") { _, _ in asset(PackageResources.board_js, type: "text/javascript; charset=utf-8") }
        router.get("/state.json") { _, _ in
            var headers = commonHeaders(type: "application/json")
            headers[.cacheControl] = "no-store"
            return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: try encode(await hub.snapshot))))
        }
        router.get("/events") { _, _ in
            var headers = commonHeaders(type: "text/event-stream")
            headers[.cacheControl] = "no-store"
            return Response(status: .ok, headers: headers, body: ResponseBody { writer in
                let (id, snapshots) = await hub.subscribe()
                do {
                    // The page's EventSource reconnects by itself 2 s after the board went
                    // away. A graceful stop of the board ends every stream (else the server
                    // would wait for these never-ending responses).
                    try await writer.write(ByteBuffer(string: "retry: 2000\n\n"))
                    try await withGracefulShutdownHandler {
                        for await snapshot in snapshots {
                            var line = ByteBuffer(string: "data: ")
                            line.writeBytes(try encode(snapshot))
                            line.writeString("\n\n")
                            try await writer.write(line)
                            try await Task.sleep(for: updateInterval)
                        }
                    } onGracefulShutdown: {
                        Task { await hub.unsubscribe(id) }
                    }
                } catch {
                    // The page went away (or the board is stopping): nothing to report.
                }
                await hub.unsubscribe(id)
                try? await writer.finish(nil)
            })
        }
        return router
    }

    static func encode(_ snapshot: BoardSnapshot) throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return try encoder.encode(snapshot)
    }

    private static func asset(_ bytes: [UInt8], type: String) -> Response {
        var headers = commonHeaders(type: type)
        headers[.cacheControl] = "no-cache"
        return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: bytes)))
    }

    /// Everything the page loads comes from the board itself (the bench is often offline,
    /// and a wall screen should not run anyone else's script).
    private static func commonHeaders(type: String) -> HTTPFields {
        var headers = HTTPFields()
        headers[.contentType] = type
        headers[.contentSecurityPolicy] = "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        headers[.xContentTypeOptions] = "nosniff"
        headers[.init("Referrer-Policy")!] = "no-referrer"
        return headers
    }
}
