import BlockDevices
import ControlProtocol
import Foundation
import ImageHTTP
import ImageIO
import Logging
import Pipeline

/// The station: devices seen, slots, jobs. An actor owns all of it; blocking work (writing,
/// verifying, injecting) runs on one thread per job, which reports back through the actor.
/// Every state change is recorded in the ledger before it is announced (DESIGN.md §8).
public actor Station {
    public private(set) var config: StationConfig
    let ledger: Ledger
    let logger: Logger
    let hub = EventHub()
    let jobRunner: JobRunning
    let cache: ImageCacheStore?
    /// Counters for `provision metrics` (issue 18).
    var metrics: StationMetrics
    /// Every card's buffers come from here (issue 18); its limit follows `buffer_budget`.
    public nonisolated let bufferBudget = BufferBudget(limit: StationConfig.defaultBufferBudget)

    struct DeviceEntry {
        var facts: DeviceFacts
        var slot: String?
        var refusals: [SafetyPolicy.Refusal]
        /// The job for the media now in the device (running or finished).
        var jobID: Int64?
    }

    struct RunningJob {
        var record: JobRecord
        let cancellation: CancellationFlag
        var deviceNumber: UInt64?
        var removed = false
        /// Set when the ledger refused one of this job's rows: it ends failed with this.
        var ledgerFailure: String? = nil
        /// The card pipeline's end, kept until the job's final state is recorded: the metrics
        /// count that state (a pulled card's "cancelled" is recorded "failed"), with the
        /// outcome's bytes and speed.
        var outcome: CardOutcome? = nil
    }

    var devices: [UInt64: DeviceEntry] = [:]
    var running: [Int64: RunningJob] = [:]
    /// The latest record of every job that a present device points at.
    var finished: [Int64: JobRecord] = [:]
    /// USB ports (sysfs paths) with a Tegra job running.
    var tegraPorts: Set<String> = []

    public init(config: StationConfig, ledger: Ledger, logger: Logger, jobRunner: JobRunning = DefaultJobRunner(), cache: ImageCacheStore? = nil) {
        self.cache = cache
        self.config = config
        self.ledger = ledger
        self.logger = logger
        self.jobRunner = jobRunner
        self.metrics = StationMetrics(station: config.name)
        bufferBudget.limit = config.bufferBudget
    }

    var policy: SafetyPolicy {
        SafetyPolicy(mode: .station(allowLoopDevices: config.allowLoopDevices), maxDeviceSize: config.maxDeviceSize)
    }

    /// At start-up, before devices are enumerated.
    public func recoverFromLedger() async throws {
        let interrupted = try await ledger.markInterrupted()
        for job in interrupted {
            logger.warning("job \(job.id) on \(job.device) was interrupted by a daemon stop: rewrite that card", metadata: ["job": "\(job.id)", "device": "\(job.device)"])
        }
    }

    public func subscribe() -> EventSubscription { hub.subscribe() }
    /// Changes with every event published: a `status` computed under one value is still
    /// current while it holds (the control socket reuses the encoded reply).
    public nonisolated var eventGeneration: Int { hub.generation }

    // MARK: - Devices

    public func handle(_ event: DeviceEvent) async {
        switch event {
        case .block(.remove, let facts):
            await deviceGone(facts.deviceNumber, reason: "card removed")
        case .block(_, let facts):
            if facts.size == 0 {
                // A reader that keeps its node when the card is pulled reports size 0.
                await deviceGone(facts.deviceNumber, reason: "card removed")
                return
            }
            await deviceSeen(facts)
        case .recovery(let action, let usb):
            await recoveryDevice(action, usb)
        }
    }

    func deviceSeen(_ facts: DeviceFacts) async {
        if let old = devices[facts.deviceNumber], old.facts.diskSequence == facts.diskSequence, old.facts.size == facts.size,
           old.jobID != nil || old.refusals.isEmpty {
            // Same media: e.g. the `change` udev emits when a written card is closed. Not a new card.
            // Announced all the same: a watcher learns the event was seen and judged.
            devices[facts.deviceNumber]?.facts = facts
            if let entry = devices[facts.deviceNumber] { publish(.init(kind: .device, device: deviceStatus(entry))) }
            return
        }
        // New media on the node with no removal event between (a card swapped within the
        // reader's polling interval): the old card's running job is a card pulled, stopped and
        // shown so, not left running where no slot shows it.
        if let old = devices[facts.deviceNumber], old.facts.diskSequence != facts.diskSequence, let id = old.jobID, running[id] != nil {
            await deviceGone(facts.deviceNumber, reason: "card replaced")
        }
        // A refused card is judged again on every event for it: unmounting it, for one,
        // ends with a `change` (udev's watch), and "mounted at …" must not outlive the mount.
        let slot = config.slot(forSlotPath: facts.slotPath)
        let profile = slot.flatMap { config.profiles[$0.profile] }
        var refusals = policy.refusals(for: facts, minimumSize: profile.flatMap { minimumSize(of: $0) })
        if slot == nil, refusals.isEmpty {
            refusals.append(.init(rule: .notEligible, reason: "in no configured slot (slot path \(facts.slotPath ?? "unknown"))"))
        }
        // Judged again on every event: counted once per media, not once per event.
        let refusedBefore = devices[facts.deviceNumber].map { !$0.refusals.isEmpty && $0.facts.diskSequence == facts.diskSequence } ?? false
        var entry = DeviceEntry(facts: facts, slot: slot?.name, refusals: refusals, jobID: nil)
        defer { publish(.init(kind: .device, device: deviceStatus(entry))) }
        guard refusals.isEmpty, let slot, let profile else {
            devices[facts.deviceNumber] = entry
            if isCandidate(facts) {
                // Counted: cards in a slot the policy refused. A device in no slot is not a
                // refused card (another bench's loop device, a stick in a spare port).
                if !refusedBefore, slot != nil { metrics.refusedCard() }
                logger.notice("refusing \(facts.devnode): \(refusals.map(\.reason).joined(separator: "; "))", metadata: ["device": "\(facts.devnode)"])
            }
            return
        }
        // Media we already wrote (a daemon restart with the card still in): show its job, do not rewrite.
        if let seq = facts.diskSequence, let last = try? await ledger.lastJob(deviceNumber: facts.deviceNumber, diskSequence: seq) {
            entry.jobID = last.id
            finished[last.id] = last
            devices[facts.deviceNumber] = entry
            return
        }
        devices[facts.deviceNumber] = entry
        do {
            let job = try await startJob(kind: "sd", slot: slot.name, facts: facts, profile: profile, image: nil)
            devices[facts.deviceNumber]?.jobID = job.id
        } catch {
            logger.error("cannot start a job on \(facts.devnode): \(error)")
        }
    }

    func deviceGone(_ devnum: UInt64, reason: String) async {
        guard let entry = devices.removeValue(forKey: devnum) else { return }
        if let id = entry.jobID {
            finished.removeValue(forKey: id)
            if running[id] != nil {
                running[id]?.removed = true
                running[id]?.cancellation.cancel()
            }
        }
        publish(.init(kind: .deviceRemoved, device: deviceStatus(entry), message: reason))
    }

    /// Whether an operator cares about a refusal: devices that look like cards.
    func isCandidate(_ f: DeviceFacts) -> Bool {
        f.tags.contains("provision") || (f.isLoop && config.allowLoopDevices && f.size > 0) || config.slot(forSlotPath: f.slotPath) != nil
    }

    private var sizeCache: [String: UInt64?] = [:]

    /// What the image needs on the card, known before writing: bmap ImageSize or the
    /// container's size; the profile's own minimum when larger.
    func minimumSize(of profile: Profile) -> UInt64? {
        guard let image = profile.image else { return nil }
        let key = image.file
        // An image on a server: known once the station downloaded it (a rebuilt image may
        // differ, so asked each time, never kept here); before that the card is judged when
        // the download is in, before its first byte (CardPipeline).
        if HTTPImage.isURL(key) { return max(cache?.knownImageSize(url: key) ?? 0, image.minDeviceSize ?? 0) }
        if let cached = sizeCache[key] { return max(cached ?? 0, image.minDeviceSize ?? 0) }
        var size: UInt64?
        if case .file(let b) = image.bmap, let bmap = try? Bmap.load(path: b) { size = bmap.imageSize }
        else if case .discover = image.bmap, let b = Bmap.locate(forImage: image.file), let bmap = try? Bmap.load(path: b) { size = bmap.imageSize }
        else { size = (try? ImageSource(path: image.file))?.uncompressedSizeHint }
        sizeCache[key] = size
        return max(size ?? 0, image.minDeviceSize ?? 0)
    }

    // MARK: - Jobs

    func startJob(kind: String, slot: String?, facts: DeviceFacts, profile: Profile?, image: String?) async throws -> JobRecord {
        let record = try await ledger.insert(.init(kind: kind, slot: slot, device: facts.devnode, deviceNumber: facts.deviceNumber,
                                                   diskSequence: facts.diskSequence, serial: facts.serial, unit: nil,
                                                   profile: profile?.name, image: image ?? profile?.image?.file))
        let flag = CancellationFlag()
        running[record.id] = RunningJob(record: record, cancellation: flag, deviceNumber: facts.deviceNumber)
        logger.info("job \(record.id): writing \(record.image ?? "?") to \(facts.devnode)", metadata: ["job": "\(record.id)", "device": "\(facts.devnode)", "slot": "\(slot ?? "")"])
        publish(.init(kind: .job, job: record))
        let job = cardJob(record: record, facts: facts, profile: profile, image: image)
        // The pipeline reports down a stream; this task turns each report into a ledger row
        // and then an event, in order. It ends when the pipeline has sent its last report.
        let (reports, continuation) = AsyncStream<CardReport>.makeStream(bufferingPolicy: .unbounded)
        let id = record.id
        Task { for await report in reports { await self.apply(report, to: id) } }
        jobRunner.startCard(job, id: id, cancellation: flag, reports: continuation)
        return record
    }

    /// What the pipeline needs for this card: the profile's image and rules, the station's
    /// cache and inventory, buffers sized for the batch.
    func cardJob(record: JobRecord, facts: DeviceFacts, profile: Profile?, image: String?) -> CardJob {
        var job = CardJob(image: image ?? profile?.image?.file ?? "", target: facts.devnode, policy: policy)
        job.expectedMedia = MediaIdentity(facts)
        job.minimumDeviceSize = profile?.image?.minDeviceSize
        job.verify = profile?.image?.verify ?? true
        job.probeCapacity = profile?.image?.probe ?? true
        job.probeStashDirectory = config.cacheDirectory
        job.probePipedRuns = CapacityProbe.pipedRuns(slots: config.slots.count)
        // A card once found counterfeit or failing is refused on sight (issue 16). A ledger
        // that cannot be read refuses too: the station cannot tell that card from another.
        let ledger = self.ledger
        job.knownCard = { card in
            do { return try ledger.cardRefusal(id: card.id) } catch {
                return "cannot check \(card) against the ledger (\(ledger.path)): \(error)"
            }
        }
        // A manual flash of a bare image only uses a bmap that sits next to it.
        job.bmap = switch profile?.image?.bmap ?? .discover {
        case .none: .none
        case .file(let path): .file(path)
        case .discover: .discover
        }
        job.supplier = cache
        // Buffers for all cards together come from one budget (issue 18): a card takes a
        // buffer when it needs one and gives it back after each chunk, so it holds about one
        // chunk being written and one being read back, and more only when it would otherwise
        // wait and the budget has room. The reload of `buffer_budget` applies from here.
        bufferBudget.limit = config.bufferBudget
        job.budget = bufferBudget
        job.chunkSize = Self.chunkSize(budget: config.bufferBudget, cards: max(running.count, config.slots.count))
        if let profile, !profile.blobs.isEmpty {
            // Raw blobs (a boot loader at 8 KiB, say) go with the image; the first chunk's
            // partition table is checked against them before anything is written.
            job.blobs = profile.blobs.compactMap { blob in
                FileManager.default.contents(atPath: blob.file).map {
                    RawBlob(name: (blob.file as NSString).lastPathComponent, offset: blob.offset, bytes: [UInt8]($0))
                }
            }
            let missing = profile.blobs.filter { !FileManager.default.fileExists(atPath: $0.file) }.map(\.file)
            job.inspectFirstChunk = { chunk in
                if let first = missing.first {
                    throw ImageIOError(.imageMissing, "raw blob not found: \(first) (profile \(profile.name))")
                }
                try profile.checkBlobs(againstImageStart: chunk)
            }
        }
        if let profile {
            let inventory = config.inventoryPath, export = config.passwordExportPath
            let serial = facts.serial, slot = record.slot, id = record.id
            job.provisioning = {
                // The job's id, or with a shared ledger a number unique in the lab (issue 18).
                try UnitPlan.make(profile: profile, inventoryPath: inventory, exportPath: export,
                                  serial: serial, slot: slot, sequence: try ledger.unitSequence(job: id))
            }
        }
        return job
    }

    /// The chunk a card writes: 4 MiB (an SD card's erase block; `benchmarks/chunks.sh`)
    /// while the budget holds a chunk being written and a piece being read back for every
    /// card that may run at once, less (down to 1 MiB) when there are more cards, so that
    /// every card always finds what it needs to make progress; what is left over serves the
    /// cards that want a chunk more in flight. 48 MiB: 4 MiB chunks up to 11 cards, 2 MiB up
    /// to 21, 1 MiB for 32 (40 MiB of the 48).
    static func chunkSize(budget: Int, cards: Int) -> Int {
        var chunk = 4 << 20
        while chunk > 1 << 20 && (chunk + ImageWriter.readBackPiece) * max(cards, 1) > budget { chunk /= 2 }
        return min(chunk, max(budget / 4096, 1) * 4096)
    }

    /// One report of a card's pipeline, in the order sent.
    func apply(_ report: CardReport, to id: Int64) async {
        switch report {
        case .stage(let stage, let note, let unit, let progress):
            if let progress { metrics.progress(id, progress) }
            await transition(id, to: JobState(stage), message: note, unit: unit, progress: progress.map { JobProgress($0) })
        case .progress(let p):
            metrics.progress(id, p)
            self.progress(id, JobProgress(p))
        case .accounts(let unit, let accounts):
            do {
                try await ledger.recordUsers(job: id, users: accounts.map { (name: $0.name, uid: $0.uid, hash: $0.hash, passwordExport: $0.exportedTo) })
                running[id]?.record.unit = unit
                running[id]?.record.users = accounts.map { UnitAccount($0) }
            } catch {
                ledgerFailed(id, error)
            }
        case .finished(let outcome):
            running[id]?.outcome = outcome
            await rememberCard(outcome, job: id)
            switch outcome {
            case .done(let result):
                // A repair is said where every done job is (status, jobs, the journal): the
                // card matched only after one rewrite (issue 16).
                let repaired = result.write.repairedAt.map { at in
                    "done after a repair (the card returned other data at byte \(at.map(String.init).joined(separator: ", byte ")) once; rewritten and read back right)"
                }
                let slow = await slowCardNote(result).map { "; " + $0 } ?? ""
                await transition(id, to: .done, message: (repaired ?? "done") + " — remove card" + slow, unit: result.unit,
                                 users: result.unit == nil ? nil : result.accounts.map { UnitAccount($0) })
            case .failed(let failure):
                await transition(id, to: .failed, message: failure.message)
            case .cancelled(let message):
                await transition(id, to: .cancelled, message: message)
            }
        }
    }

    /// Cards remembered (issue 16), refused ones first.
    public func cards() async throws -> [CardSummary] { try await ledger.cards() }

    /// An admin clears a card: it is no longer refused. False when no such card is known.
    public func forgetCard(_ id: String) async throws -> Bool { try await ledger.forgetCard(id: id) }

    /// What a job found out about its card goes into the ledger before the job's end is
    /// announced (issue 16): a card found counterfeit or failing is refused on sight later.
    private func rememberCard(_ outcome: CardOutcome, job id: Int64) async {
        let card: CardIdentity, verdict: CardVerdict, reason: String?, repairs: Int, rate: Double?
        switch outcome {
        case .done(let result):
            guard let identified = result.card else { return }
            card = identified
            repairs = result.write.repairedAt?.count ?? 0
            verdict = repairs > 0 ? .repaired : .good
            reason = result.write.repairedAt.map { "repaired at byte " + $0.map(String.init).joined(separator: ", byte ") }
            let seconds = result.write.writeSeconds + result.write.syncSeconds
            rate = seconds > 0 ? Double(result.write.bytesWritten) / seconds : nil
        case .failed(let failure):
            guard let identified = failure.card, let found = failure.verdict else { return }
            card = identified
            verdict = found
            reason = failure.message
            repairs = 0
            rate = nil
        case .cancelled:
            return
        }
        do {
            try await ledger.rememberCard(id: card.id, strength: card.strength.rawValue, detail: card.detail, verdict: verdict.rawValue,
                                          reason: reason, job: id, repairs: repairs, writeBytesPerSecond: rate)
        } catch {
            ledgerFailed(id, error)
        }
    }

    /// A job's state change: recorded first, then announced (DESIGN.md §8). A state the
    /// ledger does not hold is never announced as recorded: the job fails and says why.
    public func transition(_ id: Int64, to state: JobState, message: String? = nil, unit: String? = nil, users: [UnitAccount]? = nil, progress: JobProgress? = nil) async {
        guard let before = running[id] else { return }
        var state = state
        var message = message
        if let failure = before.ledgerFailure, state.isFinal {
            state = .failed
            message = failure
        } else if state == .failed || state == .cancelled, before.removed {
            state = .failed
            message = "card removed during \(before.record.state.rawValue); the card is incomplete"
        }
        var recorded = true
        do {
            if let hook = beforeLedgerWrite { await hook(id, state) }
            try await ledger.record(job: id, state: state, message: message, unit: unit, bytesTotal: progress?.bytesTotal)
        } catch {
            recorded = false
            ledgerFailed(id, error)
            guard state.isFinal else { return }
            // The job is over either way; what the ledger lacks, the announcement says.
            if state == .done { state = .failed }
            message = (message.map { $0 + "; " } ?? "") + (running[id]?.ledgerFailure ?? "the ledger could not record this")
        }
        // Read again after the await: a removal, a cancel or a ledger failure may have come
        // in meanwhile, and writing back the copy from before would lose it.
        guard var job = running[id] else { return }
        job.record.state = state
        job.record.message = message
        job.record.updated = Date()
        if let unit { job.record.unit = unit }
        if let users { job.record.users = users }
        if let progress { job.record.progress = progress }
        if state.isFinal {
            running.removeValue(forKey: id)
            if let outcome = job.outcome {
                metrics.finished(id, state: state, outcome: outcome, started: job.record.created)
            } else {
                metrics.forget(id)
            }
            // Generated passwords are shown once, in this announcement, and not kept.
            var kept = job.record
            kept.users = kept.users?.map(\.redacted)
            // Kept while a present device shows it (a card pulled before its job ended has
            // none: a record kept for it would stay for as long as the daemon runs).
            if devices.values.contains(where: { $0.jobID == id }) { finished[id] = kept }
            let level: Logger.Level = state == .done ? .info : .error
            logger.log(level: level, "job \(id) \(state.rawValue)\(message.map { ": " + $0 } ?? "")\(recorded ? "" : " (not in the ledger)")",
                       metadata: ["job": "\(id)", "device": "\(job.record.device)", "slot": "\(job.record.slot ?? "")"])
        } else {
            running[id] = job
        }
        publish(.init(kind: .job, job: job.record))
    }

    /// Test seam: runs before each job state is written to the ledger (a test holds a write
    /// open here to change the world while the station awaits it).
    var beforeLedgerWrite: (@Sendable (Int64, JobState) async -> Void)?
    func setBeforeLedgerWrite(_ hook: (@Sendable (Int64, JobState) async -> Void)?) { beforeLedgerWrite = hook }

    /// The ledger refused a row of a running job: the job is stopped and will end failed with
    /// the reason (its card cannot be vouched for by a ledger that does not know it).
    func ledgerFailed(_ id: Int64, _ error: any Error) {
        logger.error("ledger write failed for job \(id): \(error)", metadata: ["job": "\(id)"])
        guard running[id] != nil, running[id]?.ledgerFailure == nil else { return }
        running[id]?.ledgerFailure = "the ledger (\(ledger.path)) could not record this job: \(error); write the card again"
        running[id]?.cancellation.cancel()
    }

    /// Progress within a state: not ledgered (it is not a state change), only announced.
    public func progress(_ id: Int64, _ p: JobProgress) {
        guard running[id] != nil else { return }
        running[id]?.record.progress = p
        publish(.init(kind: .job, job: running[id]!.record))
    }

    public func cancel(job id: Int64) async throws(ErrorPayload) -> JobRecord {
        guard let job = running[id] else {
            throw ErrorPayload(.notFound, "job \(id) is not running")
        }
        job.cancellation.cancel()
        return job.record
    }

    /// A manual job: a profile (or a bare image) onto a device, outside the slots.
    public func flash(device: String, profileName: String?, image: String?) async throws(ErrorPayload) -> JobRecord {
        let facts: DeviceFacts
        do { facts = try DeviceFacts.read(path: device) } catch { throw ErrorPayload(.notFound, error.description) }
        var profile: Profile?
        if let profileName {
            guard let p = config.profiles[profileName] else { throw ErrorPayload(.notFound, "no profile named \(profileName)") }
            profile = p
        }
        guard profile != nil || image != nil else { throw ErrorPayload(.badRequest, "flash needs a profile or an image") }
        if running.values.contains(where: { $0.deviceNumber == facts.deviceNumber }) {
            throw ErrorPayload(.conflict, "\(device) is already being written")
        }
        var minimum: UInt64?
        if let profile { minimum = minimumSize(of: profile) } else if let image { minimum = (try? ImageSource(path: image))?.uncompressedSizeHint }
        let refusals = policy.refusals(for: facts, minimumSize: minimum)
        guard refusals.isEmpty else {
            metrics.refusedCard()
            throw ErrorPayload(.refused, "refusing \(device): " + refusals.map(\.reason).joined(separator: "; "))
        }
        let slot = config.slot(forSlotPath: facts.slotPath)?.name
        do {
            let job = try await startJob(kind: "sd", slot: slot, facts: facts, profile: profile, image: image)
            // The device shows the new job; its previous finished one is no longer shown.
            if let previous = devices[facts.deviceNumber]?.jobID { finished.removeValue(forKey: previous) }
            devices[facts.deviceNumber, default: DeviceEntry(facts: facts, slot: slot, refusals: [], jobID: nil)].jobID = job.id
            return job
        } catch {
            throw ErrorPayload(.internalError, "\(error)")
        }
    }

    /// Applies a reloaded configuration, but for the settings fixed at start
    /// (`StationConfig.keepStartSettings`): returns the configuration in force and the keys
    /// whose new values wait for a restart.
    @discardableResult
    public func reload(_ loaded: StationConfig) async -> (applied: StationConfig, kept: [String]) {
        var newConfig = loaded
        let kept = newConfig.keepStartSettings(of: config)
        config = newConfig
        // At once, not at the next card: the metrics say the cap in force, and idle buffers
        // above a lowered cap go now.
        bufferBudget.limit = newConfig.bufferBudget
        sizeCache = [:]
        publish(.init(kind: .reload, message: "configuration reloaded from \(newConfig.file)" + Self.restartNote(kept)))
        // Cards already present without a job are judged again by the new configuration: a
        // slot it adds starts its card's job, and refusals it lifts (or makes) say so now,
        // not at the card's next udev event. Cards with a job keep it.
        for entry in devices.values where entry.jobID == nil {
            await deviceSeen(entry.facts)
        }
        return (newConfig, kept)
    }

    /// "; not applied until provisiond restarts: name, cache_dir (the running values stay)".
    public static func restartNote(_ kept: [String]) -> String {
        kept.isEmpty ? "" : "; not applied until provisiond restarts: \(kept.joined(separator: ", ")) (the running values stay)"
    }

    // MARK: - Status

    func deviceStatus(_ e: DeviceEntry) -> DeviceStatus {
        DeviceStatus(device: e.facts.devnode, summary: e.facts.summary, size: e.facts.size, serial: e.facts.serial, slot: e.slot,
                     slotPath: e.facts.slotPath, eligible: e.refusals.isEmpty, refusals: e.refusals.map(\.reason))
    }

    func record(for id: Int64?) -> JobRecord? {
        guard let id else { return nil }
        return running[id]?.record ?? finished[id]
    }

    public func status() -> StationStatus {
        var slots: [SlotStatus] = []
        var shownJobs: Set<Int64> = []
        for slot in config.slots {
            let entry = devices.values.first { $0.slot == slot.name }
            let job = record(for: entry?.jobID)
            if let job { shownJobs.insert(job.id) }
            slots.append(SlotStatus(name: slot.name, profile: slot.profile, device: entry?.facts.devnode, job: job,
                                    refusals: entry.flatMap { $0.refusals.isEmpty ? nil : $0.refusals.map(\.reason) }))
        }
        let others = running.values.map(\.record).filter { !shownJobs.contains($0.id) }.sorted { $0.id < $1.id }
        let refused = devices.values.filter { !$0.refusals.isEmpty && isCandidate($0.facts) && $0.slot == nil }
            .map(deviceStatus).sorted { $0.device < $1.device }
        return StationStatus(station: config.name, slots: slots, otherJobs: others, refused: refused)
    }

    public func deviceList() -> [DeviceStatus] {
        devices.values.map(deviceStatus).sorted { $0.device < $1.device }
    }

    public func jobs(_ filter: Ledger.Filter) async throws -> [JobRecord] {
        var list = try await ledger.jobs(filter)
        // Live progress for the running ones.
        for i in list.indices { if let live = running[list[i].id] { list[i] = live.record } }
        return list
    }

    public var runningJobCount: Int { running.count }

    /// Prometheus' text format: this station's counters and its present state.
    public func metricsText() -> String {
        // (Mutating: the metrics remember which slots they showed.)
        metrics.text(slots: config.slots.map(\.name), running: running.values.map(\.record.slot), cache: cache, buffers: bufferBudget.usage)
    }

    /// At shutdown: cancels every running job and waits until each has recorded its end.
    public func cancelAll(waitingUpTo limit: Duration) async -> Int {
        let count = running.count
        for job in running.values { job.cancellation.cancel() }
        let deadline = ContinuousClock.now + limit
        while !running.isEmpty && ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(50))
        }
        return count
    }

    func publish(_ event: Event) { hub.publish(event) }
}
