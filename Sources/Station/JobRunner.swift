import BlockDevices
import ControlProtocol
import Foundation
import ImageIO
import Pipeline
import ProvisionCShims
import Tegra

/// Everything a Tegra job's thread needs; the station stays the only owner of shared state.
/// (SD cards run the card pipeline, which reports through a stream instead.)
public struct JobContext: Sendable {
    public let record: JobRecord
    /// The card, for SD jobs.
    public let facts: DeviceFacts!
    /// The board, for Tegra jobs.
    public var usb: RecoveryUSBDevice? = nil
    public let profile: Profile?
    public let imageOverride: String?
    public let cancellation: CancellationFlag
    public let station: Station

    /// Reports a state change and waits until the ledger holds it.
    func transition(_ state: JobState, _ message: String? = nil, unit: String? = nil, users: [UnitAccount]? = nil, progress: JobProgress? = nil) {
        let station = station, id = record.id
        blockingAwait { await station.transition(id, to: state, message: message, unit: unit, users: users, progress: progress) }
    }

    func report(_ p: JobProgress) {
        let station = station, id = record.id
        blockingAwait { await station.progress(id, p) }
    }
}

/// How jobs are executed; the daemon uses `DefaultJobRunner`, tests may substitute.
public protocol JobRunning: Sendable {
    /// A Tegra board.
    func start(_ context: JobContext)
    /// An SD card: runs `job` to its end and sends every report to `reports`, then
    /// finishes the stream. Must not block the caller.
    func startCard(_ job: CardJob, id: Int64, cancellation: CancellationFlag, reports: AsyncStream<CardReport>.Continuation)
}

/// One thread per job: SD cards through the card pipeline, Tegra boards through libusb.
public struct DefaultJobRunner: JobRunning {
    /// Where Tegra jobs find their board; the daemon uses libusb, tests the simulated boot ROM.
    let tegraSource: @Sendable (RecoveryUSBDevice, [UInt16]) -> any TegraDeviceSource

    public init(tegraSource: @escaping @Sendable (RecoveryUSBDevice, [UInt16]) -> any TegraDeviceSource = { usb, ids in
        LibUSBDeviceSource(selector: .busAddress(bus: UInt8(truncatingIfNeeded: usb.busNumber), address: UInt8(truncatingIfNeeded: usb.deviceAddress)), productIDs: ids)
    }) {
        self.tegraSource = tegraSource
    }

    public func start(_ context: JobContext) {
        let source = tegraSource
        let name = "prov-job-\(context.record.id)"
        let thread = Thread {
            provision_name_thread(name)
            if let usb = context.usb { TegraJob(context: context, usb: usb, source: source).run() }
        }
        thread.start()
    }

    public func startCard(_ job: CardJob, id: Int64, cancellation: CancellationFlag, reports: AsyncStream<CardReport>.Continuation) {
        let thread = Thread {
            provision_name_thread("prov-job-\(id)")
            // The pipeline and all it made end with this scope: nothing of the card's stays.
            _ = CardPipeline(job: job, cancellation: cancellation, sink: reports).run()
            reports.finish()
        }
        thread.start()
    }
}
