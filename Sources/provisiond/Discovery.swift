import BlockDevices
import Logging
import ServiceLifecycle
import Station

/// udev discovery: enumerate at start, then one thread blocked in poll(2) on the monitor
/// socket. Events are handed to the station in order through one stream.
struct Discovery: Service {
    let station: Station
    let logger: Logger
    let monitor: DeviceMonitor

    init(station: Station, logger: Logger) throws {
        self.station = station
        self.logger = logger
        self.monitor = try DeviceMonitor()
    }

    func run() async throws {
        if monitor.source == .kernel {
            logger.warning("no udevd is running: listening to kernel uevents, so udev properties (ID_PATH, tags) are missing; only loop cards can match slots")
        }
        let (events, continuation) = AsyncStream<DeviceEvent>.makeStream()
        for event in monitor.enumerate() { continuation.yield(event) }
        monitor.start { continuation.yield($0) }
        await withGracefulShutdownHandler {
            for await event in events.cancelOnGracefulShutdown() {
                await station.handle(event)
            }
        } onGracefulShutdown: {
            monitor.stop()
            continuation.finish()
        }
    }
}
