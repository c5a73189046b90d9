#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import BlockDevices
import ControlProtocol
import Foundation

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status", abstract: "One line a slot: device, unit, state, progress, speed, ETA, image; refused devices with their reason.",
        discussion: """
        With --lab (a station whose ledger is a lab's shared PostgreSQL database): every station of \
        the lab as the database holds it — when each last reached it, its cards done and failed \
        today, its running jobs — and this station's outbox (rows not yet sent, and why).
        """)
    @OptionGroup var options: ClientOptions
    @Flag(help: "Every station of the lab, from the shared ledger (asked through this station's daemon).")
    var lab = false

    func run() throws {
        try withClient(options) { client in
            if lab {
                let status = try client.call(.labStatus, returning: \.lab)
                if options.json { try printJSON(status) } else { print(LabTable.render(status), terminator: "") }
                return
            }
            let status = try client.call(.status, returning: \.status)
            if options.json { try printJSON(status) } else { print(StatusTable.render(status), terminator: "") }
        }
    }
}

enum LabTable {
    static func render(_ lab: LabStatus) -> String {
        var out = "lab ledger \(lab.database): \(lab.stations.count) station(s), \(lab.unitsNumbered) unit(s) numbered\n"
        var rows = [["STATION", "SEEN", "JOBS", "DONE TODAY", "FAILED TODAY", "RUNNING", "UNSENT"]]
        let f = ISO8601DateFormatter()
        for s in lab.stations {
            rows.append([s.name, s.live ? "live" : "last " + f.string(from: s.lastSeen), "\(s.jobs)", "\(s.doneToday)", "\(s.failedToday)",
                         "\(s.running.count)", "\(s.outboxPending)"])
        }
        out += StatusTable.table(rows)
        let running = lab.stations.flatMap(\.running)
        if !running.isEmpty {
            var jobs = [["STATION", "SLOT", "DEVICE", "UNIT", "STATE", "PROGRESS", "MB/s", "ETA", "IMAGE"]]
            for j in running { jobs.append([j.station ?? "-"] + StatusTable.row(slot: j.slot ?? "-", job: j)) }
            out += StatusTable.table(jobs)
        }
        if let o = lab.outbox {
            out += "this station: " + (o.connected ? "connected" : "database unreachable" + (o.downSince.map { " since " + f.string(from: $0) } ?? ""))
                + ", \(o.pending) row(s) waiting in the outbox, \(o.unitsReserved) unit number(s) in hand"
                + (o.lastError.map { " (\($0))" } ?? "") + "\n"
        }
        return out
    }
}

enum StatusTable {
    static func render(_ s: StationStatus) -> String {
        var rows: [[String]] = [["SLOT", "DEVICE", "UNIT", "STATE", "PROGRESS", "MB/s", "ETA", "IMAGE"]]
        for slot in s.slots {
            if let job = slot.job {
                rows.append(row(slot: slot.name, job: job))
            } else if let refusals = slot.refusals {
                rows.append([slot.name, slot.device ?? "-", "-", "refused: " + refusals.joined(separator: "; "), "", "", "", slot.profile])
            } else {
                rows.append([slot.name, slot.device ?? "-", "-", slot.device == nil ? "empty" : "idle", "", "", "", slot.profile])
            }
        }
        for job in s.otherJobs { rows.append(row(slot: job.slot ?? "-", job: job)) }
        var out = "station \(s.station)\n" + table(rows)
        for d in s.refused {
            out += "refused \(d.device) (\(d.summary)): \(d.refusals.joined(separator: "; "))\n"
        }
        // Where generated passwords went, never the passwords: this screen is shared.
        for job in s.slots.compactMap(\.job) + s.otherJobs {
            if let notes = passwordNotes(job) { out += "\(job.slot ?? job.device) \(job.unit ?? "job \(job.id)"): \(notes)\n" }
        }
        return out
    }

    /// "pi: password exported to /var/lib/provision/passwords.tsv; lab: …", nil when no
    /// password of the job was generated.
    static func passwordNotes(_ job: JobRecord) -> String? {
        let notes = (job.users ?? []).compactMap(\.passwordNote)
        return notes.isEmpty ? nil : notes.joined(separator: "; ")
    }

    static func row(slot: String, job: JobRecord) -> [String] {
        let p = job.progress
        var state = job.state.rawValue
        switch job.state {
        // A repair or a slow card is said in the done message (issue 16): shown, not hidden.
        case .done: state = job.message.flatMap { $0.hasPrefix("done") ? $0 : nil } ?? "done — remove card"
        case .failed: state = "failed: " + (job.message ?? "?")
        case .interrupted: state = "interrupted — rewrite card"
        case .cancelled: state = "cancelled — card incomplete"
        default: break
        }
        let active = !job.state.isFinal
        let progress = active ? (p?.fraction.map { String(format: "%3.0f%%", $0 * 100) } ?? p.map { ByteCount.human($0.bytesDone) } ?? "") : ""
        let rate = active ? (p.map { $0.bytesPerSecond > 0 ? String(format: "%.1f", $0.bytesPerSecond / 1e6) : "" } ?? "") : ""
        let eta = active ? (p?.secondsRemaining.map { clock($0) } ?? "") : ""
        let image = job.image.map { ($0 as NSString).lastPathComponent } ?? job.profile ?? "-"
        return [slot, job.device, job.unit ?? job.serial ?? "-", state, progress, rate, eta, image]
    }

    static func table(_ rows: [[String]]) -> String {
        let widths = (0..<rows[0].count).map { c in rows.map { $0[c].count }.max() ?? 0 }
        return rows.map { r in
            r.enumerated().map { i, v in i == r.count - 1 ? v : v.padding(toLength: widths[i], withPad: " ", startingAt: 0) }.joined(separator: "  ")
        }.joined(separator: "\n") + "\n"
    }

    static func clock(_ seconds: Double) -> String {
        let s = Int(seconds.rounded())
        return s >= 3600 ? String(format: "%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60) : String(format: "%d:%02d", s / 60, s % 60)
    }
}

struct WatchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "watch", abstract: "Follow the station live: a redrawn table on a terminal, one line per event otherwise.")
    @OptionGroup var options: ClientOptions
    @Flag(help: "Exit once no job is running and every card present has finished (for scripts and the demo).")
    var untilIdle = false
    @Option(help: "With --until-idle: wait for at least this many finished jobs first (jobs, not slots: a slot's second card counts too).")
    var expectJobs: Int = 0

    func validate() throws {
        guard expectJobs >= 0 else { throw ValidationError("--expect-jobs takes a number of jobs, 0 or more") }
    }

    func run() throws {
        try withClient(options) { client in
            let statusClient = try options.connect()
            let interactive = isatty(STDOUT_FILENO) != 0 && !options.json
            _ = try client.call(.watch)
            var lastDraw = Date.distantPast
            // Idle: nothing running, and at least `expectJobs` jobs finished: those the slots
            // show (so jobs that ended before we connected count too) and those this watch saw
            // end (a card pulled, or a slot's earlier card, shows in no slot any more).
            var finishedJobs = Set<Int64>()
            func idle(_ s: StationStatus) -> Bool {
                let active = s.slots.contains { $0.job.map { !$0.state.isFinal } ?? false } || !s.otherJobs.isEmpty
                for slot in s.slots { if let job = slot.job, job.state.isFinal { finishedJobs.insert(job.id) } }
                return !active && finishedJobs.count >= expectJobs
            }
            if interactive { redraw(try statusClient.call(.status, returning: \.status)) }
            if untilIdle, idle(try statusClient.call(.status, returning: \.status)) { return }
            // Jobs this watch saw start and not end: while one is, the station is not idle, and
            // asking for its whole status at every card's end or udev change would only say so
            // (with 32 cards that was ~70 status replies of 32 slots each: 0.09 s of the daemon's
            // user CPU for the batch, a third of its station threads'). Asked anyway every 2 s,
            // in case an event was missed.
            var running = Set<Int64>()
            var lastAsked = Date()
            let encoder = JSONEncoder()
            encoder.dateEncodingStrategy = .iso8601
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            while let event = try client.nextEvent() {
                if let job = event.job {
                    if job.state.isFinal { running.remove(job.id); finishedJobs.insert(job.id) } else { running.insert(job.id) }
                }
                if options.json {
                    emitLine(String(decoding: try encoder.encode(event), as: UTF8.self))
                } else if interactive {
                    if Date().timeIntervalSince(lastDraw) > 0.25 || event.job?.state.isFinal == true {
                        lastDraw = Date()
                        redraw(try statusClient.call(.status, returning: \.status))
                    }
                } else {
                    emitLine(line(event))
                }
                if untilIdle, event.job?.state.isFinal == true || event.kind == .deviceRemoved || event.kind == .device,
                   running.isEmpty || Date().timeIntervalSince(lastAsked) > 2 {
                    lastAsked = Date()
                    if idle(try statusClient.call(.status, returning: \.status)) {
                        if interactive { redraw(try statusClient.call(.status, returning: \.status)) }
                        return
                    }
                }
            }
        }
    }

    func redraw(_ s: StationStatus) {
        FileHandle.standardOutput.write(Data(("\u{1B}[H\u{1B}[2J" + StatusTable.render(s)).utf8))
    }

    func line(_ e: Event) -> String {
        let t = Date().formatted(.iso8601)
        switch e.kind {
        case .job:
            guard let j = e.job else { return "\(t) job" }
            let r = StatusTable.row(slot: j.slot ?? "-", job: j)
            let notes = StatusTable.passwordNotes(j).map { " — " + $0 } ?? ""
            return "\(t) job \(j.id) \(r[0]) \(r[1]) \(r[3]) \(r[4]) \(r[5].isEmpty ? "" : r[5] + " MB/s")".trimmingCharacters(in: .whitespaces) + notes
        case .device:
            guard let d = e.device else { return "\(t) device" }
            return "\(t) device \(d.device) \(d.summary)" + (d.eligible ? (d.slot.map { " in slot \($0)" } ?? "") : " refused: " + d.refusals.joined(separator: "; "))
        case .deviceRemoved:
            return "\(t) removed \(e.device?.device ?? "?")"
        case .reload:
            return "\(t) reload: \(e.message ?? "")"
        }
    }
}

struct JobsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "jobs", abstract: "Job history from the ledger, newest first.")
    @OptionGroup var options: ClientOptions
    @Option(help: "Only jobs in this state (done, failed, interrupted, …).") var state: String?
    @Option(help: "Only jobs of this slot.") var slot: String?
    @Option(help: "Only jobs on this device.") var device: String?
    @Option(help: "At most this many.") var limit: Int = 50
    @Flag(help: "Every station's jobs, from the lab's shared ledger (newest change first).") var lab = false
    @Option(help: "With --lab: only this station's jobs.") var station: String?

    func validate() throws {
        guard (1...10_000).contains(limit) else { throw ValidationError("--limit takes 1 to 10000 jobs") }
        if station != nil, !lab { throw ValidationError("--station needs --lab (this station's own jobs need no filter by station)") }
        if lab, device != nil { throw ValidationError("--device names a device of one station; with --lab use --station and --slot") }
    }

    func run() throws {
        try withClient(options) { client in
            let jobs = lab ? try client.call(.labJobs, .init(labJobsOf: station, state: state, slot: slot, limit: limit), returning: \.jobs)
                : try client.call(.jobs, .init(state: state, slot: slot, device: device, limit: limit), returning: \.jobs)
            if options.json { try printJSON(jobs); return }
            var rows = [(lab ? ["STATION"] : []) + ["JOB", "WHEN", "SLOT", "DEVICE", "UNIT", "STATE", "IMAGE", "MESSAGE"]]
            let f = ISO8601DateFormatter()
            for j in jobs {
                rows.append((lab ? [j.station ?? "-"] : []) + ["\(j.id)", f.string(from: j.created), j.slot ?? "-", j.device, j.unit ?? j.serial ?? "-", j.state.rawValue,
                             j.image.map { ($0 as NSString).lastPathComponent } ?? "-",
                             [j.message, StatusTable.passwordNotes(j)].compactMap { $0 }.joined(separator: "; ")])
            }
            print(StatusTable.table(rows), terminator: "")
        }
    }
}

struct DevicesCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "devices", abstract: "Every block device the daemon sees, with its safety verdict.")
    @OptionGroup var options: ClientOptions

    func run() throws {
        try withClient(options) { client in
            let devices = try client.call(.devices, returning: \.devices)
            if options.json { try printJSON(devices); return }
            var rows = [["DEVICE", "SIZE", "SLOT", "VERDICT", "DESCRIPTION"]]
            for d in devices {
                rows.append([d.device, ByteCount.human(d.size), d.slot ?? "-", d.eligible ? "ok" : "refused: " + d.refusals.joined(separator: "; "), d.summary])
            }
            print(StatusTable.table(rows), terminator: "")
        }
    }
}

struct FlashCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "flash", abstract: "Ask the daemon to write a profile or an image onto a device now (admins only).")
    @OptionGroup var options: ClientOptions
    @Argument(help: "Whole-disk device, e.g. /dev/sdb.") var device: String
    @Option(help: "Profile name from the station config.") var profile: String?
    @Option(help: "Image file (instead of a profile).") var image: String?

    func validate() throws {
        if (profile == nil) == (image == nil) { throw ValidationError("give exactly one of --profile or --image") }
    }

    func run() throws {
        try withClient(options) { client in
            let job = try client.call(.flash, .init(device: device, profile: profile, image: image.map { URL(fileURLWithPath: $0).standardizedFileURL.path }), returning: \.job)
            if options.json { try printJSON(job) } else { print("job \(job.id) queued: \(job.image ?? job.profile ?? "") → \(job.device)") }
        }
    }
}

struct CancelCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "cancel", abstract: "Cancel a running job (admins only); the card is left incomplete.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "Job number (see provision status / jobs).") var job: Int64

    func run() throws {
        try withClient(options) { client in
            let r = try client.call(.cancel, .init(job: job))
            if options.json, let record = r.job { try printJSON(record) } else { print(r.message ?? "cancelling job \(job)") }
        }
    }
}

struct ReloadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "reload", abstract: "Make the daemon read its station config again (admins only).")
    @OptionGroup var options: ClientOptions

    func run() throws {
        try withClient(options) { client in
            let message = try client.call(.reload).message ?? "reloaded"
            if options.json { try printJSON(["message": message]) } else { print(message) }
        }
    }
}
