#if canImport(Glibc)
import Glibc
#endif
import ControlProtocol
import Dispatch
import Foundation
import Logging
import ProvisionClient
import ServiceLifecycle
import Synchronization

/// Keeps the hub's state in step with provisiond: one connection that watches, one for
/// status and ledger queries, both read-only. When the daemon goes away the hub is told
/// why (the page shows it in a banner) and the feed reconnects on its own, quickly at
/// first and then every few seconds, for as long as the board runs.
///
/// The client is blocking (the CLI's), so it runs on a thread of its own, never on Swift's
/// cooperative pool; the thread hands what it reads to the service through a stream, in
/// order.
final class StationFeed: Service, Sendable {
    let socketPath: String
    let hub: BoardHub
    let logger: Logger

    init(socketPath: String, hub: BoardHub, logger: Logger) {
        self.socketPath = socketPath; self.hub = hub; self.logger = logger
    }

    enum Message: Sendable {
        case connected(Hello)
        case status(StationStatus)
        case finished([JobRecord])
        case event(Event)
        case disconnected(String)
        /// The lab's view (issue 18), read every few seconds; `labUnavailable(nil)` for a
        /// station with its own ledger, else why the view is not current.
        case lab(LabStatus)
        case labUnavailable(String?)
    }

    func run() async throws {
        let (messages, continuation) = AsyncStream.makeStream(of: Message.self)
        let worker = Worker(socketPath: socketPath, output: continuation, logger: logger)
        let thread = Thread { worker.loop() }
        thread.name = "board-feed"
        thread.start()
        let labPoller = LabPoller(socketPath: socketPath, output: continuation)
        let labThread = Thread { labPoller.loop() }
        labThread.name = "board-lab"
        labThread.start()
        await withGracefulShutdownHandler {
            await withTaskGroup(of: Void.self) { group in
                group.addTask { [hub] in
                    for await message in messages { await hub.apply(message) }
                }
                group.addTask { [hub] in
                    // Redrawn every 10 s even when nothing happens: the day's counts roll
                    // over at midnight, finished Tegra tiles expire, and each page hears
                    // from the board often enough to notice a dead connection.
                    while !Task.isCancelled {
                        try? await Task.sleep(for: .seconds(10))
                        await hub.touch()
                    }
                }
                await group.next()
                group.cancelAll()
            }
        } onGracefulShutdown: {
            worker.stop()
            labPoller.stop()
        }
        worker.stop()
        labPoller.stop()
        await hub.close()
    }

    /// The thread's side: connect, watch, hand over, reconnect.
    final class Worker: @unchecked Sendable {
        // @unchecked: `state` is behind its mutex; the rest is immutable.
        private let socketPath: String
        private let output: AsyncStream<Message>.Continuation
        private let logger: Logger
        private let wakeUp = DispatchSemaphore(value: 0)
        private let state = Mutex(State())
        /// Used by the feed's thread only.
        private var warnedAboutAdmin = false

        private struct State {
            var stopping = false
            var open: [ReadOnlyControl] = []
        }

        init(socketPath: String, output: AsyncStream<Message>.Continuation, logger: Logger) {
            self.socketPath = socketPath; self.output = output; self.logger = logger
        }

        func stop() {
            let open = state.withLock { s -> [ReadOnlyControl] in
                s.stopping = true
                return s.open
            }
            for connection in open { connection.shutdown() }
            wakeUp.signal()
        }

        private var stopping: Bool { state.withLock { $0.stopping } }

        func loop() {
            var delay = 0.25
            var lastProblem: String?
            while !stopping {
                var followed = false
                do {
                    try session(followed: &followed)
                } catch {
                    if stopping { break }
                    if followed {
                        // It answered this time: the next outage is news, and worth a quick retry.
                        lastProblem = nil
                        delay = 0.25
                    }
                    let reason = Self.explain(error, socketPath: socketPath)
                    output.yield(.disconnected(reason))
                    if reason != lastProblem {
                        logger.error("\(reason) — retrying until it answers")
                        lastProblem = reason
                    }
                    _ = wakeUp.wait(timeout: .now() + delay)
                    delay = min(delay * 2, 3)
                }
            }
            output.finish()
        }

        /// One connection's life; returns or throws when the daemon goes away.
        private func session(followed: inout Bool) throws {
            // Whatever ends this session, the connections go with it (closed by deinit).
            defer { state.withLock { $0.open.removeAll() } }
            let watch = try ReadOnlyControl(socket: socketPath)
            try keep(watch)
            var query = try ReadOnlyControl(socket: socketPath)
            try keep(query)
            // The daemon closes a connection that asks nothing for idle_client_timeout; on a
            // quiet station the query connection is asked nothing for minutes, so it is opened
            // again when a question finds it closed (a daemon that is gone fails that too).
            func ask<T>(_ question: (ReadOnlyControl) throws -> T) throws -> T {
                do { return try question(query) } catch let error as CLIError where error.status == 69 {
                    logger.debug("the query connection to provisiond was closed (\(error.message)); opening it again")
                    query = try ReadOnlyControl(socket: socketPath)
                    try keep(query)
                    return try question(query)
                }
            }
            if watch.greeting.access == "admin", !warnedAboutAdmin {
                warnedAboutAdmin = true
                logger.warning("connected to provisiond with admin rights; the board needs only read access: run it as a member of group provision, not root or provision-admin (its systemd unit does)")
            }
            // Connected means answering: a daemon that lets the board in but refuses to read
            // (a user outside the socket's group) is reported as the problem it is.
            let status = try watch.watch()
            output.yield(.connected(watch.greeting))
            output.yield(.status(status))
            output.yield(.finished(try ask { try $0.finishedJobs(states: [.done, .failed, .interrupted]) }))
            followed = true
            logger.info("following station \(watch.greeting.station) at \(socketPath)")
            while let event = try watch.nextEvent() {
                output.yield(.event(event))
                // Job events carry the whole job; a device coming or going, or a reload,
                // changes slots in ways only a fresh status tells.
                if event.kind != .job { output.yield(.status(try ask { try $0.status() })) }
            }
            throw CLIError.unreachable("provisiond closed the connection")
        }

        private func keep(_ connection: ReadOnlyControl) throws {
            let stopping = state.withLock { s -> Bool in
                if !s.stopping { s.open.append(connection) }
                return s.stopping
            }
            if stopping { throw CancellationError() }
        }

        /// The CLI's messages, with the advice a board's operator can act on.
        static func explain(_ error: any Error, socketPath: String) -> String {
            guard let error = error as? CLIError else { return "provisiond at \(socketPath): \(error)" }
            switch error.status {
            case 77:
                return "no permission to open \(socketPath): the board's user must be in the socket's group (provision); its systemd unit sets SupplementaryGroups=provision"
            case 69:
                return error.message.replacingOccurrences(of: "--socket PATH / PROVISION_SOCKET", with: "provision board --socket PATH")
            default:
                return "provisiond at \(socketPath) refused the board: \(error.message)"
            }
        }
    }
}

/// Reads the lab's status every few seconds on a connection of its own (issue 18): the lab
/// has no event stream (other stations' changes reach this daemon only through the shared
/// database), so the lab section of the page lags by up to `interval`. A station that keeps
/// its own ledger is asked again only every 30 s, on a connection opened for that question
/// and closed after it (a reload may make it part of a lab). When
/// the daemon is away this poller stays quiet: the station's feed reports that.
final class LabPoller: @unchecked Sendable {
    // @unchecked: `state` is behind its mutex; the rest is immutable or used by the thread only.
    private let socketPath: String
    private let output: AsyncStream<StationFeed.Message>.Continuation
    private let wakeUp = DispatchSemaphore(value: 0)
    private let state = Mutex<(stopping: Bool, open: ReadOnlyControl?)>((false, nil))
    static let interval = 2.0

    init(socketPath: String, output: AsyncStream<StationFeed.Message>.Continuation) {
        self.socketPath = socketPath; self.output = output
    }

    func stop() {
        let open = state.withLock { s -> ReadOnlyControl? in
            s.stopping = true
            return s.open
        }
        open?.shutdown()
        wakeUp.signal()
    }

    func loop() {
        var control: ReadOnlyControl?
        while !state.withLock({ $0.stopping }) {
            var wait = Self.interval
            if control == nil {
                do {
                    let opened = try ReadOnlyControl(socket: socketPath)
                    let stopping = state.withLock { s -> Bool in
                        if !s.stopping { s.open = opened }
                        return s.stopping
                    }
                    if stopping { break }
                    control = opened
                } catch {
                    // The station's daemon did not let the poller in: not the lab's database.
                    if let report = Self.report(openFailure: error, socketPath: socketPath) { output.yield(report) }
                    _ = wakeUp.wait(timeout: .now() + wait)
                    continue
                }
            }
            do {
                if let lab = try control?.labStatus() {
                    output.yield(.lab(lab))
                } else {
                    // No lab: no connection held for it either (the board keeps its two).
                    output.yield(.labUnavailable(nil))
                    control = nil
                    state.withLock { $0.open = nil }
                    wait = 30
                }
            } catch let error as CLIError where error.status != 69 {
                // The daemon answered on an open connection, the lab's database did not.
                output.yield(.labUnavailable(error.message))
            } catch {
                control = nil
                state.withLock { $0.open = nil }
            }
            _ = wakeUp.wait(timeout: .now() + wait)
        }
    }

    /// What the page is told when the poller's connection cannot be opened. A daemon that is
    /// away (69) is left to the station's feed, whose banner says so; one that refuses this
    /// connection (its client limit, 75; the socket's permissions, 77) while the feed's own
    /// connections stand is said in the feed's words, as the reason the lab view is not
    /// current, never as a fault of the lab's database.
    static func report(openFailure error: any Error, socketPath: String) -> StationFeed.Message? {
        guard let error = error as? CLIError, error.status != 69 else { return nil }
        return .labUnavailable(StationFeed.Worker.explain(error, socketPath: socketPath))
    }
}
