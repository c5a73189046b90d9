import Accounts
import BlockDevices
import Foundation
import ImageHTTP
import ImageIO

/// One card, start to end: open the device and judge it on its descriptor → write →
/// verify → inject → check (DESIGN.md §2, "one card pipeline"). `provision write` runs it
/// on its main thread, `provisiond` on a thread per card.
///
/// It owns everything it makes — the image source and its descriptors, the write engine's
/// threads and buffers, the device's descriptors — and releases all of it before `run`
/// returns, however the job ends (done, failed, cancelled, card pulled): nothing it made
/// outlives the call. It reports through a `CardReportSink` and never calls back into
/// whoever runs it; the station turns the reports into ledger rows and events.
public final class CardPipeline: Sendable {
    public let job: CardJob
    public let cancellation: CancellationFlag
    private let sink: any CardReportSink

    public init(job: CardJob, cancellation: CancellationFlag = CancellationFlag(), sink: any CardReportSink) {
        self.job = job
        self.cancellation = cancellation
        self.sink = sink
    }

    /// Runs the card on the calling thread; blocking. Sends `.finished` last, and returns
    /// the same outcome.
    public func run() -> CardOutcome {
        let outcome: CardOutcome
        var card: CardIdentity?
        do throws(CardFailure) {
            outcome = .done(try perform(&card))
        } catch let failure where failure.kind == .image(.cancelled) {
            outcome = .cancelled(failure.message)
        } catch {
            var failure = error
            failure.card = card
            outcome = .failed(failure)
        }
        sink.receive(.finished(outcome))
        return outcome
    }

    private func perform(_ card: inout CardIdentity?) throws(CardFailure) -> CardResult {
        let bmap = try loadBmap()
        let supplied = try supply(bmap: bmap)
        defer { job.supplier?.release(supplied) }
        let source = supplied.source
        // Known from the inventory and the profile, so it fails before the card is touched.
        let unit: UnitProvisioning?
        do { unit = try job.provisioning?() } catch let e as AccountsError {
            throw CardFailure(.accounts(e.code), e.message)
        } catch {
            throw CardFailure(.accounts(.invalidSpec), "\(error)")
        }
        let blobEnd = job.blobs.map { $0.offset + UInt64($0.bytes.count) }.max() ?? 0
        let needed = max(bmap?.imageSize ?? source.uncompressedSizeHint ?? 0, job.minimumDeviceSize ?? 0, blobEnd)

        // A job cancelled (or its card pulled) while its image was made ready does not open
        // the card at all: the node may be gone, or hold another card by now.
        if cancellation.isCancelled { throw CardFailure(.image(.cancelled), "cancelled before the card was opened; nothing was written") }
        let (target, facts) = try OpenedCard.open(job, minimumSize: needed > 0 ? needed : nil)
        defer { target.close() }
        let media = target.deviceNumber.map { MediaIdentity(deviceNumber: $0, diskSequence: target.diskSequence) }
        do { try job.confirm?(facts) } catch let e as CardFailure { throw e } catch {
            throw CardFailure(.refused, "\(error)")
        }
        if cancellation.isCancelled { throw CardFailure(.image(.cancelled), "cancelled before writing; nothing was written") }
        card = CardIdentity.read(target, facts: facts)
        if let card, let refusal = job.knownCard?(card) { throw CardFailure(.refused, refusal) }
        // What the image overwrites next need not be restored after a passed probe: all of
        // it without a bmap, its mapped ranges with one (the others keep what they held).
        let overwritten: [Range<UInt64>] = bmap.map { $0.mappedByteRanges.map { $0.start..<$0.end } }
            ?? source.uncompressedSizeHint.map { [0..<$0] } ?? []
        let leftover = CapacityProbe.Leftover()
        let probe = try probeCapacity(target, media: media, overwritten: overwritten, leftover: leftover)

        var options = WriteOptions()
        options.cancellation = cancellation
        options.verify = job.verify
        options.bmap = bmap
        options.chunkSize = job.chunkSize
        options.bufferCount = job.bufferCount
        options.budget = job.budget
        options.blobs = job.blobs
        options.sourceCheckedAgainstBmap = supplied.checkedAgainstBmap
        if let inspect = job.inspectFirstChunk { options.inspectFirstChunk = { try inspect($0) } }
        if let hook = job.testHookBeforeVerify { options.testHookBeforeVerify = { hook($0) } }
        // The last look before the first byte: the media the verdict was made for, still.
        options.beforeFirstWrite = { t in try media?.check(t, before: "written") }
        options.onFirstByte = { leftover.imageBegins() }

        let meter = StageMeter(interval: job.progressInterval)
        sink.receive(.stage(.writing, note: supplied.note ?? "\(source.formatName) image", unit: nil,
                            progress: WriteProgress(phase: .writing, bytesDone: 0, bytesTotal: bmap?.mappedBytes ?? source.uncompressedSizeHint,
                                                    bytesPerSecond: 0, secondsRemaining: nil)))
        let sink = self.sink
        let written: WriteResult
        do throws(ImageIOError) {
            written = try ImageWriter.write(source: source, to: target, options: options) { p in
                if let report = meter.report(p) { sink.receive(report) }
            }
        } catch {
            // Ended before the image's first byte: the probe's blocks go, the card's bytes come
            // back (on the card probed, not on one put in its place).
            if !leftover.isEmpty, (try? media?.check(target, before: "restored")) != nil || media == nil {
                leftover.restore(to: target)
            }
            var failure = CardFailure(error)
            if error.code == .cancelled && !leftover.imageBegan {
                failure = CardFailure(.image(.cancelled), "cancelled before writing; nothing was written")
            }
            // With the repair on, a mismatch means the card returned other data twice.
            if error.code == .verifyMismatch && options.repair { failure.verdict = .failing }
            throw failure
        }
        var result = CardResult(write: written, facts: facts, unit: unit?.unitName)
        result.probe = probe
        result.card = card
        guard let unit else { return result }

        // The writer's exclusive descriptor goes (libext2fs claims the device itself); the
        // guard keeps the written device reachable as itself until the check is done.
        let guardFD = try MediaGuard(target: target, media: media)
        target.close()
        if cancellation.isCancelled { throw CardFailure(.image(.cancelled), "cancelled after verifying, before the accounts were added") }
        try guardFD.checkStillSame(before: "injected")
        let provisioned = try UnitProvisioner.provision(unit, path: guardFD.path, childPath: guardFD.pathForChild, describe: guardFD.describe) { step throws(CardFailure) in
            switch step {
            case .injecting(let note): sink.receive(.stage(.injecting, note: note, unit: unit.unitName, progress: nil))
            case .injected(let accounts): sink.receive(.accounts(unit: unit.unitName, accounts))
            case .checking(let note): sink.receive(.stage(.checking, note: note, unit: unit.unitName, progress: nil))
            }
        }
        try guardFD.checkStillSame(before: "checked")
        result.accounts = provisioned.accounts
        result.partition = provisioned.report.partition
        return result
    }

    /// The capacity probe (issue 16) on a block device, unless the job turned it off: a card
    /// that stores less than it claims is refused before the first image byte, and is left
    /// as it was (the probe restores what it overwrote).
    private func probeCapacity(_ target: WriteTarget, media: MediaIdentity?, overwritten: [Range<UInt64>],
                               leftover: CapacityProbe.Leftover) throws(CardFailure) -> CapacityProbe.Result? {
        guard job.probeCapacity, target.kind == .blockDevice else { return nil }
        do throws(ImageIOError) { try media?.check(target, before: "probed or written") } catch { throw CardFailure(error) }
        let result: CapacityProbe.Result
        do throws(CapacityProbe.Failure) {
            // The probe's buffer is the station's (issue 18), and what it overwrote waits in pipes
            // (its first runs, as many as the pipe quota leaves) and in the cache directory.
            result = try CapacityProbe.run(target, overwritten: overwritten, budget: job.budget,
                                           stashDirectory: job.probeStashDirectory, cancellation: cancellation, leftover: leftover,
                                           pipedRuns: job.probePipedRuns)
        } catch {
            if cancellation.isCancelled { throw CardFailure(.image(.cancelled), "cancelled before writing; nothing was written") }
            throw CardFailure(.image(.ioError), error.description)
        }
        if let refusal = result.refusal {
            var failure = CardFailure(.refused, "\(refusal) (\(target.path))")
            failure.verdict = .counterfeit
            throw failure
        }
        return result
    }

    private func loadBmap() throws(CardFailure) -> Bmap? {
        do throws(ImageIOError) {
            switch job.bmap {
            case .none: return nil
            case .file(let path): return HTTPImage.isURL(path) ? try HTTPImage.loadBmap(url: path) : try Bmap.load(path: path)
            // An image on a server: its bmap is looked for next to it there (issue 17).
            case .discover where HTTPImage.isURL(job.image): return try HTTPImage.locateBmap(forImage: job.image)
            case .discover: return try Bmap.locate(forImage: job.image).map { (p: String) throws(ImageIOError) in try Bmap.load(path: p) }
            }
        } catch {
            throw CardFailure(error)
        }
    }

    private func supply(bmap: Bmap?) throws(CardFailure) -> SuppliedImage {
        do throws(ImageIOError) {
            if let supplier = job.supplier {
                // The station downloads an image named by URL before the first byte (issue
                // 17): the card is "downloading" meanwhile, with the download's progress.
                let meter = DownloadMeter(interval: job.progressInterval, url: job.image)
                let sink = self.sink
                let cancellation = self.cancellation
                return try supplier.supply(image: job.image, bmap: bmap, cancelled: { cancellation.isCancelled }) { received, total in
                    if let report = meter.report(received: received, total: total) { sink.receive(report) }
                }
            }
            if HTTPImage.isURL(job.image) {
                // Streamed as it downloads: no copy for a single card (the source holds the
                // download and ends it with itself).
                let (source, _) = try HTTPImage.source(url: job.image, forceRaw: job.forceRaw)
                return SuppliedImage(source: source, token: nil, note: "streaming \(source.formatName) from \(job.image)", checkedAgainstBmap: false)
            }
            return SuppliedImage(source: try ImageSource(path: job.image, forceRaw: job.forceRaw), token: nil, note: nil, checkedAgainstBmap: false)
        } catch {
            throw CardFailure(error)
        }
    }
}

/// The station's download of a card's image as reports: the `downloading` stage once, then
/// its progress (bytes, rate, ETA where the server announced a length) at most once per
/// interval. Called from the downloading thread only.
private final class DownloadMeter: @unchecked Sendable {
    let interval: Duration
    let url: String
    var meter = PhaseMeter(phase: .preparing, total: nil)
    var last: ContinuousClock.Instant?

    init(interval: Duration, url: String) {
        self.interval = interval
        self.url = url
    }

    func report(received: UInt64, total: UInt64?) -> CardReport? {
        let now = ContinuousClock.now
        let first = last == nil
        // Called for every chunk received: nothing is built for a report not sent.
        guard first || now - last! >= interval || (total != nil && received == total) else { return nil }
        last = now
        meter.done = received
        meter.total = total
        var p = meter.progress
        p.bytesDownloaded = received
        p.downloadTotal = total
        return first ? .stage(.downloading, note: "downloading \(url)", unit: nil, progress: p) : .progress(p)
    }
}

/// Turns the write engine's progress into stage changes (always reported, and only ever
/// forward: a late progress event of an earlier phase is not a step back) and progress
/// within a stage (at most once per interval). Touched only by the writing thread.
private final class StageMeter: @unchecked Sendable {
    let interval: Duration
    var stage = CardStage.writing
    var last = ContinuousClock.now

    init(interval: Duration) { self.interval = interval }

    func report(_ p: WriteProgress) -> CardReport? {
        let now = ContinuousClock.now
        let stage: CardStage = switch p.phase {
        case .preparing, .writing: .writing
        case .syncing: .syncing
        case .verifying, .done: .verifying
        }
        if stage > self.stage {
            self.stage = stage
            last = now
            return .stage(stage, note: nil, unit: nil, progress: p)
        }
        guard stage == self.stage, now - last >= interval else { return nil }
        last = now
        return .progress(p)
    }
}
