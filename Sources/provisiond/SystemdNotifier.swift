import ControlProtocol
import Foundation
import Logging
import ProvisionCShims
import ServiceLifecycle
import Station

/// sd_notify: READY once the socket is bound, STATUS on every job change, WATCHDOG at half
/// the interval systemd asked for. Outside systemd every call is a no-op (no NOTIFY_SOCKET).
/// The watchdog timer is the daemon's only periodic wake-up.
final class SystemdNotifier: Service, @unchecked Sendable {
    let station: Station
    let logger: Logger
    private let readySignal = AsyncStream<Void>.makeStream()

    init(station: Station, logger: Logger) {
        self.station = station
        self.logger = logger
    }

    static func notify(_ state: String) {
        _ = state.withCString { provision_sd_notify($0) }
    }

    func ready() { readySignal.continuation.yield() }

    func run() async throws {
        let watchdog = provision_sd_watchdog_usec()
        await withGracefulShutdownHandler {
          // Both loops below run forever; a graceful shutdown cancels them.
          try? await cancelWhenGracefulShutdown {
            await withTaskGroup(of: Void.self) { group in
                if watchdog > 0 {
                    group.addTask {
                        let interval = Duration.microseconds(Int64(watchdog / 2))
                        while !Task.isCancelled {
                            Self.notify("WATCHDOG=1")
                            try? await Task.sleep(for: interval)
                        }
                    }
                }
                group.addTask { [station = self.station] in
                    var iterator = self.readySignal.stream.makeAsyncIterator()
                    _ = await iterator.next()
                    Self.notify("READY=1\nSTATUS=ready: waiting for cards")
                    // Outside systemd nobody listens: no subscription, only the wait for the
                    // shutdown that cancels this task (a service whose run() returned would
                    // end the daemon).
                    guard getenv("NOTIFY_SOCKET") != nil else {
                        while await iterator.next() != nil {}
                        return
                    }
                    // STATUS on a job's change of state, not on its progress reports (once a
                    // second a card: with 32 cards, 32 messages a second to systemd saying
                    // the same). A subscription that overflowed (this loop fell far behind) is
                    // renewed: STATUS only ever shows the latest state anyway.
                    var said: [Int64: JobState] = [:]
                    while !Task.isCancelled {
                        for await event in await station.subscribe() where event.kind == .job {
                            guard let job = event.job, said[job.id] != job.state else { continue }
                            if job.state.isFinal { said.removeValue(forKey: job.id) } else { said[job.id] = job.state }
                            let running = await station.runningJobCount
                            Self.notify("STATUS=\(running) job(s) running; job \(job.id) \(job.state.rawValue)")
                        }
                    }
                }
                await group.waitForAll()
            }
          }
        } onGracefulShutdown: {
            Self.notify("STOPPING=1")
        }
    }
}
