import ControlProtocol
import Foundation

/// The board's picture of the station, fed by the daemon's status replies and watch events
/// and turned into a `BoardSnapshot` for the page. A value with no I/O, so every rule about
/// what a tile shows is tested without a daemon.
public struct BoardState: Sendable {
    public private(set) var station = "" {
        // The lab section marks this station's row; it is rebuilt only when the name changes.
        didSet { if station != oldValue { rebuildLabSection() } }
    }
    public private(set) var connected = false
    public private(set) var problem: String? = "connecting to provisiond"
    /// The configured slots, in the config's order, as the last status gave them; job
    /// events update their jobs in between.
    private var slots: [SlotStatus] = []
    /// The last failure per slot, kept after the card is pulled (the status then shows an
    /// empty slot) so the operator still sees why that card went to the reject pile, until
    /// the next card arrives in the slot.
    private var lastFailure: [String: JobRecord] = [:]
    /// Jobs outside the slots (Tegra boards, manual `flash`), by id.
    private var otherJobs: [Int64: JobRecord] = [:]
    /// Finished jobs by id with their state and time, for the header's counts.
    private var finished: [Int64: (state: JobState, updated: Date)] = [:]

    /// The lab's view (issue 18): nil until a station with a shared ledger answered.
    private var lab: LabStatus?
    private var labProblem: String?
    /// The page's lab section, built when the lab's data changes (every 2 s at most), not
    /// on every snapshot: a snapshot is sent for each job event and progress report, and
    /// the lab's running jobs would otherwise be turned into tiles again each time.
    private var labSection: BoardSnapshot.Lab?
    /// How often the lab section was built (a test checks that events do not rebuild it).
    private(set) var labSectionBuilds = 0

    /// How long a finished Tegra or manual job keeps its tile.
    public static let finishedTileLifetime: TimeInterval = 15 * 60

    public init() {}

    // MARK: - Feeding

    public mutating func connected(station: String) {
        self.station = station
        connected = true
        problem = nil
    }

    public mutating func disconnected(_ reason: String) {
        connected = false
        problem = reason
    }

    /// A full status: the slot list and their jobs as the daemon has them now.
    public mutating func apply(_ status: StationStatus) {
        station = status.station
        slots = status.slots
        for slot in status.slots {
            if let job = slot.job { note(job) }
            // A new card in the slot (or the failed one still in it) replaces the memory.
            if slot.device != nil, let kept = lastFailure[slot.name], slot.job?.id != kept.id {
                lastFailure[slot.name] = nil
            }
        }
        let running = Set(status.otherJobs.map(\.id))
        for job in status.otherJobs { otherJobs[job.id] = job; note(job) }
        // A job the daemon no longer lists as running ended while we were not watching.
        for (id, job) in otherJobs where !job.state.isFinal && !running.contains(id) {
            otherJobs[id] = nil
        }
    }

    /// The ledger's finished jobs (from `jobs`), for the day's counts after a (re)connect.
    public mutating func apply(finishedJobs: [JobRecord]) {
        for job in finishedJobs where job.state.isFinal { finished[job.id] = (job.state, job.updated) }
    }

    /// The lab's status as the daemon read it from the shared ledger. Returns false when it
    /// is the one already shown (the poller reads it every 2 s; most reads change nothing),
    /// so the hub does not send the page a lab it would only redraw.
    @discardableResult
    public mutating func apply(lab: LabStatus) -> Bool {
        guard lab != self.lab || labProblem != nil else { return false }
        self.lab = lab
        labProblem = nil
        rebuildLabSection()
        return true
    }

    /// The lab's view could not be read: `nil` for a station that keeps its own ledger (the
    /// section goes), else why (the last view stays, marked as not current). Returns false
    /// when that is what the board already shows.
    @discardableResult
    public mutating func labUnavailable(_ reason: String?) -> Bool {
        guard reason != labProblem || (reason == nil && lab != nil) else { return false }
        if reason == nil { lab = nil }
        labProblem = reason
        rebuildLabSection()
        return true
    }

    public mutating func apply(_ event: Event) {
        guard event.kind == .job, let job = event.job else { return }
        note(job)
        if let name = job.slot, let i = slots.firstIndex(where: { $0.name == name }) {
            // Events of an older job of this slot (a late progress report) do not replace
            // the newer one.
            if let current = slots[i].job, current.id > job.id { return }
            slots[i].job = job
            slots[i].device = job.device
            slots[i].refusals = nil
            if job.id != lastFailure[name]?.id { lastFailure[name] = nil }
        } else {
            otherJobs[job.id] = job
        }
    }

    private mutating func note(_ job: JobRecord) {
        guard job.state.isFinal else { return }
        finished[job.id] = (job.state, job.updated)
        if let slot = job.slot, job.state != .done { lastFailure[slot] = job }
        if finished.count > Self.pruneThreshold { prune(before: job.updated.addingTimeInterval(-2 * 86_400)) }
    }

    var finishedCount: Int { finished.count }

    /// A board runs for months: what no tile or count can show any more is dropped.
    static let pruneThreshold = 5_000

    private mutating func prune(before limit: Date) {
        finished = finished.filter { $0.value.updated >= limit }
        otherJobs = otherJobs.filter { !$0.value.state.isFinal || $0.value.updated >= limit }
    }

    // MARK: - The page's view

    public func snapshot(now: Date = Date(), calendar: Calendar = .current) -> BoardSnapshot {
        let today = calendar.startOfDay(for: now)
        let todays = finished.values.filter { $0.updated >= today }
        let done = todays.filter { $0.state == .done }.count
        let failed = todays.filter { $0.state == .failed || $0.state == .interrupted }.count

        var tiles = slots.map(tile(for:))
        let others = otherJobs.values
            .filter { !$0.state.isFinal || now.timeIntervalSince($0.updated) < Self.finishedTileLifetime }
            .sorted { $0.id < $1.id }
        // One tile per Tegra board (its chip UID), showing its newest job.
        var boards: [String: JobRecord] = [:]
        for job in others where job.kind == "tegra" { boards[job.serial ?? job.device] = job }
        tiles += boards.values.sorted { $0.id < $1.id }.map { job in
            Self.tile(job, key: "tegra:" + (job.serial ?? job.device), kind: .tegra, name: "Tegra " + Self.shortSerial(job))
        }
        tiles += others.filter { $0.kind != "tegra" }.map { job in
            Self.tile(job, key: "job:\(job.id)", kind: .manual, name: (job.device as NSString).lastPathComponent)
        }
        var snapshot = BoardSnapshot(station: station, connected: connected, problem: problem,
                                     doneToday: done, failedToday: failed, tiles: tiles)
        snapshot.lab = labSection
        return snapshot
    }

    /// "last seen" times of the lab's stations, in the board's local time.
    private static let labTime: DateFormatter = {
        let time = DateFormatter()
        time.dateFormat = "yyyy-MM-dd HH:mm:ss"
        return time
    }()

    private mutating func rebuildLabSection() {
        labSection = lab.map(labView)
        labSectionBuilds += 1
    }

    private func labView(_ lab: LabStatus) -> BoardSnapshot.Lab {
        let time = Self.labTime
        return BoardSnapshot.Lab(database: lab.database, problem: labProblem, unitsNumbered: lab.unitsNumbered, stations: lab.stations.map { s in
            BoardSnapshot.Lab.Station(
                name: s.name, here: s.name == station, live: s.live, seen: s.live ? "live" : "last seen " + time.string(from: s.lastSeen),
                doneToday: s.doneToday, failedToday: s.failedToday, unsent: s.outboxPending,
                running: s.running.map { job in
                    Self.tile(job, key: "lab:\(s.name):\(job.id)", kind: .slot, name: job.slot ?? (job.device as NSString).lastPathComponent)
                })
        })
    }

    private func tile(for slot: SlotStatus) -> BoardSnapshot.Tile {
        let key = "slot:" + slot.name
        if let job = slot.job { return Self.tile(job, key: key, kind: .slot, name: slot.name) }
        if let refusals = slot.refusals, !refusals.isEmpty {
            return .init(key: key, kind: .slot, name: slot.name, tone: .refused, word: "refused", device: slot.device,
                         detail: Redaction.scrub(refusals.joined(separator: "; ")))
        }
        if slot.device == nil, let failure = lastFailure[slot.name] {
            var tile = Self.tile(failure, key: key, kind: .slot, name: slot.name)
            tile.device = nil
            return tile
        }
        return .init(key: key, kind: .slot, name: slot.name, tone: .idle, word: "idle", device: slot.device,
                     detail: slot.device == nil ? "insert a card" : "card present, not written")
    }

    static func tile(_ job: JobRecord, key: String, kind: BoardSnapshot.Tile.Kind, name: String) -> BoardSnapshot.Tile {
        let (tone, word) = look(job.state)
        var tile = BoardSnapshot.Tile(key: key, kind: kind, name: name, tone: tone, word: word,
                                      unit: Redaction.scrub(job.unit), device: job.device,
                                      image: job.image.map { ($0 as NSString).lastPathComponent } ?? job.profile,
                                      detail: Redaction.scrub(job.message), job: job.id)
        if !job.state.isFinal, let p = job.progress {
            tile.percent = p.fraction.map { ($0 * 1000).rounded() / 10 }
            tile.megabytesPerSecond = p.bytesPerSecond > 0 ? (p.bytesPerSecond / 1e5).rounded() / 10 : nil
            tile.secondsRemaining = p.secondsRemaining.map { $0.rounded() }
        }
        if job.state == .done { tile.percent = 100 }
        // "done — remove card" is the daemon's message for a finished job: said once.
        if tile.detail == word { tile.detail = nil }
        return tile
    }

    /// Colour and word of a job state. The words for final states tell the operator what
    /// to do with the card, as `provision status` does.
    static func look(_ state: JobState) -> (BoardSnapshot.Tile.Tone, String) {
        switch state {
        case .queued: return (.busy, "queued")
        case .downloading: return (.busy, "downloading")
        case .writing, .syncing: return (.busy, "writing")
        case .verifying, .checking: return (.verifying, state == .checking ? "checking" : "verifying")
        case .injecting: return (.injecting, "injecting")
        case .rcm, .miniloader, .bct, .bootloader, .flashingOnDevice: return (.busy, state.rawValue)
        case .done: return (.done, "done — remove card")
        case .failed: return (.failed, "failed")
        case .cancelled: return (.failed, "cancelled — card incomplete")
        case .interrupted: return (.failed, "interrupted — rewrite card")
        }
    }

    private static func shortSerial(_ job: JobRecord) -> String {
        guard let serial = job.serial, !serial.isEmpty else { return (job.device as NSString).lastPathComponent }
        return serial.count > 8 ? "…" + serial.suffix(8) : serial
    }
}
