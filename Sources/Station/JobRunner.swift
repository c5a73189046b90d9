import BlockDevices
import ControlProtocol
import Foundation
import ImageIO
import ProvisionCShims
import Tegra

/// Everything a job thread needs; the station stays the only owner of shared state.
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
    /// From the station config: the operator's inventory and the password export file.
    public var inventoryPath: String? = nil
    public var passwordExportPath: String? = nil
    /// The station's decompressed-image cache (nil: each job decodes its image itself).
    public var cache: ImageCacheStore? = nil
    /// Jobs running when this one started, for sizing its buffers.
    public var concurrentJobs = 1

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
    func start(_ context: JobContext)
}

/// One thread per job: SD cards through ImageIO, Tegra boards through libusb.
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
            if let usb = context.usb { TegraJob(context: context, usb: usb, source: source).run() } else { SDJob(context: context).run() }
        }
        thread.start()
    }
}

/// One card: write, verify, then (when the profile has users) inject and check.
struct SDJob {
    /// How often a running card's progress is announced (state changes go out at once).
    static let progressInterval: Duration = .seconds(1)
    let context: JobContext

    func run() {
        let facts: DeviceFacts = context.facts
        do {
            let imagePath = context.imageOverride ?? context.profile?.image?.file
            guard let imagePath else { throw ImageIOError(.invalidArgument, "profile \(context.profile?.name ?? "?") names no image") }
            var options = WriteOptions()
            options.cancellation = context.cancellation
            options.verify = context.profile?.image?.verify ?? true
            options.bmap = try bmap(for: imagePath)
            // Buffers for all cards together stay within 64 MiB (issue 7): each job holds
            // `bufferCount` chunks plus 3 in its verifier (2 read back, 1 of the source).
            // Up to 2 cards: 7 × 4 MiB each; 3–4 cards: 6 × 2 MiB; 5 or more: 6 × 1 MiB.
            if context.concurrentJobs >= 3 {
                options.bufferCount = 3
                options.chunkSize = context.concurrentJobs >= 5 ? 1 << 20 : 2 << 20
            }
            // Compressed images are decompressed once per station into the cache; this card
            // reads the cache at its own speed.
            let (source, cacheKey, note) = try context.cache?.source(for: imagePath, bmap: options.bmap) ?? (try ImageSource(path: imagePath), nil, "")
            options.sourceCheckedAgainstBmap = cacheKey != nil
            defer { context.cache?.release(cacheKey) }
            // The verdict was made for this media: refuse if the node now holds another card.
            options.beforeFirstWrite = { target in
                if target.deviceNumber != facts.deviceNumber || (facts.diskSequence != nil && target.diskSequence != facts.diskSequence) {
                    throw ImageIOError(.deviceChanged, "\(target.path) now holds a different card than the one checked; nothing was written")
                }
            }
            // Raw blobs (a boot loader at 8 KiB, say) go with the image; the first chunk's
            // partition table is checked against them before anything is written.
            if let profile = context.profile, !profile.blobs.isEmpty {
                options.blobs = try profile.blobs.map { blob in
                    guard let data = FileManager.default.contents(atPath: blob.file) else {
                        throw ImageIOError(.imageMissing, "raw blob not found: \(blob.file) (profile \(profile.name))")
                    }
                    return RawBlob(name: (blob.file as NSString).lastPathComponent, offset: blob.offset, bytes: [UInt8](data))
                }
                options.inspectFirstChunk = { chunk in try profile.checkBlobs(againstImageStart: chunk) }
            }
            let plan = try context.profile.flatMap { profile in
                try UnitPlan.make(profile: profile, inventoryPath: context.inventoryPath, exportPath: context.passwordExportPath,
                                  serial: facts.serial, slot: context.record.slot, sequence: context.record.id)
            }
            let target = try WriteTarget.open(path: facts.devnode)
            context.transition(.writing, note.isEmpty ? nil : note, progress: JobProgress(bytesDone: 0, bytesTotal: options.bmap?.mappedBytes ?? source.uncompressedSizeHint, bytesPerSecond: 0, secondsRemaining: nil))
            let phase = PhaseBox()
            _ = try ImageWriter.write(source: source, to: target, options: options) { p in
                let state: JobState = switch p.phase {
                case .syncing: .syncing
                case .verifying: .verifying
                case .done: .verifying
                default: .writing
                }
                let progress = JobProgress(bytesDone: p.bytesDone, bytesTotal: p.bytesTotal, bytesPerSecond: p.bytesPerSecond, secondsRemaining: p.secondsRemaining)
                let now = ContinuousClock.now
                if state != phase.state {
                    phase.state = state
                    phase.lastReport = now
                    context.transition(state, progress: progress)
                } else if now - phase.lastReport >= Self.progressInterval {
                    // Progress is announced to every watcher as JSON: once a second per
                    // card is what a station screen needs, and with 8 cards at 5 Hz the
                    // announcements cost more CPU than the cards' verification.
                    phase.lastReport = now
                    context.report(progress)
                }
            }
            target.close()
            var users: [UnitAccount]? = nil
            if let plan { users = try provision(plan, device: facts.devnode) }
            context.transition(.done, "done — remove card", unit: plan?.unitName, users: users)
        } catch let e as ImageIOError {
            context.transition(e.code == .cancelled ? .cancelled : .failed, e.message)
        } catch {
            context.transition(.failed, "\(error)")
        }
    }

    func bmap(for imagePath: String) throws(ImageIOError) -> Bmap? {
        switch context.profile?.image?.bmap ?? .discover {
        case .none: return nil
        case .file(let path): return try Bmap.load(path: path)
        case .discover:
            // A bare image (manual flash) only uses a bmap that sits next to it.
            return try Bmap.locate(forImage: imagePath).map { (p: String) throws(ImageIOError) in try Bmap.load(path: p) }
        }
    }
}

/// The phase last announced; touched only by the job's own thread.
private final class PhaseBox: @unchecked Sendable {
    var state = JobState.writing
    var lastReport = ContinuousClock.now
}
