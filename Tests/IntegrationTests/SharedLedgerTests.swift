#if canImport(Glibc)
import Glibc
#endif
import ControlProtocol
import Foundation
import Synchronization
import Testing
import TestSupport

/// A lab of two stations on one shared ledger (issue 18): a real PostgreSQL server of the
/// test's own (initdb + pg_ctl, run as nobody), two real provisiond against it, loop cards in
/// both at the same moment. The database's contents are read with psql, not with the code
/// under test; each station's local ledger with sqlite3.
@Suite("Shared ledger on PostgreSQL", .serialized)
struct SharedLedgerTests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    /// Two benches (each its own directory, socket, local ledger and cards) on one database.
    final class Lab: Sendable {
        let database: PostgresServer
        let benches: [StationBench]
        let image: String

        init(stations: Int = 2, unitBlock: Int = 8) throws {
            database = try PostgresServer()
            var benches: [StationBench] = []
            do {
                for _ in 0..<stations { benches.append(try StationBench()) }
                try Command.check([SharedLedgerTests.repository + "/images/build-test-image", "--out", benches[0].directory,
                                   "--size", "128MiB", "--compress", "none", "--quiet"], timeout: .seconds(300))
                image = benches[0].directory + "/rpi-test.img"
            } catch {
                for b in benches { b.close() }
                database.close()
                throw error
            }
            self.benches = benches
            for (i, bench) in benches.enumerated() { try writeConfig(bench, name: "station-\(i + 1)", unitBlock: unitBlock) }
        }

        func close() {
            for b in benches { b.close() }
            database.close()
        }

        func writeConfig(_ bench: StationBench, name: String, unitBlock: Int, url: String? = nil) throws {
            var text = """
                [station]
                name = "\(name)"
                allow_loop_devices = true
                ledger = "\(url ?? database.url)"
                ledger_password_file = "\(database.passwordFile)"
                ledger_local = "\(bench.ledgerPath)"
                ledger_unit_block = \(unitBlock)
                cache_dir = "\(bench.directory)/cache"
                password_export = "\(bench.directory)/passwords.tsv"

                [profiles.p]
                image = "\(image)"
                [profiles.p.root]
                partition = 2
                [[profiles.p.users]]
                name = "tech"
                password = "generate"

                """
            for slot in Self.slots {
                text += """

                    [[slots]]
                    name = "\(slot)"
                    match = "loop:*/provision-card-\(bench.label(slot))-*"
                    profile = "p"

                    """
            }
            try text.write(toFile: bench.configPath, atomically: true, encoding: .utf8)
        }

        static let slots = ["S1", "S2", "S3", "S4", "S5"]

        /// Starts every station's daemon at once (each enumerates the cards already present).
        func startDaemons() throws {
            let errors = Mutex<[String]>([])
            DispatchQueue.concurrentPerform(iterations: benches.count) { i in
                do { try benches[i].startDaemon() } catch { errors.withLock { $0.append("\(error)") } }
            }
            if let first = errors.withLock({ $0.first }) { throw BenchError(first) }
        }

        /// `provision status --lab --json` of a station; nil while the database cannot answer.
        func labStatus(_ bench: StationBench) throws -> LabStatus? {
            let out = try bench.cli(["status", "--lab", "--json"])
            guard out.succeeded else { return nil }
            return try StationBench.decode(LabStatus.self, out.stdout)
        }

        /// Waits until every station has sent its whole outbox to a reachable database.
        func waitUntilCaughtUp(timeout: Duration = .seconds(300)) throws {
            let deadline = ContinuousClock.now + timeout
            var last = ""
            while ContinuousClock.now < deadline {
                let states = try benches.map { try labStatus($0)?.outbox }
                if states.allSatisfy({ $0?.connected == true && $0?.pending == 0 }) { return }
                last = "\(states)"
                usleep(200_000)
            }
            throw BenchError("the stations did not catch up with the database within \(timeout): \(last)\n" + benches.map(\.log).joined(separator: "\n---\n"))
        }

        func waitForJobs(_ bench: StationBench, slots: [String], timeout: Duration = .seconds(300)) throws -> StationStatus {
            try bench.waitForStatus("\(slots) finished", timeout: timeout) { s in slots.allSatisfy { s.slot($0)?.job?.state.isFinal == true } }
        }
    }

    /// `sqlite3` on a station's local ledger: "jobId|eventId|state" lines, in order.
    static func localEvents(_ bench: StationBench) throws -> [String] {
        try Command.check(["sqlite3", bench.ledgerPath, "SELECT jobId || '|' || id || '|' || state FROM jobEvent ORDER BY jobId, id"])
            .stdout.split(separator: "\n").map(String.init)
    }

    // Each test is async and runs its blocking steps (processes, polls with deadlines) on a
    // thread of their own through `offPool`; the expectations stay in the test's own task,
    // where Swift Testing knows which test they belong to.

    @Test("two stations, cards at the same moment, the database stopped and restarted mid-batch: unique units, both stations' rows, nothing lost or doubled")
    func twoStationsShareOneLedger() async throws {
        let lab = try await offPool { try Lab() }
        defer { lab.close() }
        let (a, b) = (lab.benches[0], lab.benches[1])
        let cards = try await offPool { () throws -> [LoopCard] in
            // First wave: three throttled cards in each station, present when both daemons
            // start together, so both stations take unit numbers at the same moment.
            var cards: [LoopCard] = []
            for bench in lab.benches {
                for slot in ["S1", "S2", "S3"] {
                    let card = try bench.card(slot: slot, size: 160 << 20)
                    try card.throttle(writeBytesPerSecond: 2_000_000)
                    cards.append(card)
                }
            }
            try lab.startDaemons()
            for bench in lab.benches {
                // Each card ~8 s at 2 MB/s. A card a loaded machine let finish before this
                // poll saw it is fine too: the second wave below is written while the
                // database is away whatever happens here.
                try bench.waitForStatus("first wave writing", timeout: .seconds(300)) { s in
                    ["S1", "S2", "S3"].allSatisfy { s.slot($0)?.job?.state.isFinal == true || (s.slot($0)?.job?.progress?.bytesDone ?? 0) > 1 << 20 }
                }
            }
            // The database goes away mid-batch.
            try lab.database.stop()
            return cards
        }
        let down = try await offPool { try a.cli(["status", "--lab"]) }
        #expect(down.status != 0 && down.stderr.contains("unreachable"), "\(down)")
        // The cards go on, and a second wave arrives while it is away: these take numbers
        // reserved before.
        let (finished, pending, more) = try await offPool { () throws -> ([StationStatus], String, [LoopCard]) in
            var more: [LoopCard] = []
            for bench in lab.benches {
                for slot in ["S4", "S5"] { more.append(try bench.card(slot: slot, size: 160 << 20)) }
            }
            let finished = try lab.benches.map { try lab.waitForJobs($0, slots: Lab.slots) }
            let pending = try Command.check(["sqlite3", a.ledgerPath, "SELECT COUNT(*) FROM labOutbox"]).stdout
            return (finished, pending.trimmingCharacters(in: .whitespacesAndNewlines), more)
        }
        for status in finished {
            for slot in Lab.slots { #expect(status.slot(slot)?.job?.state == .done, "\(status.station) \(slot): \(status.slot(slot)?.job?.message ?? "")") }
        }
        // Still away: the rows of the rest of the batch wait in each station's outbox.
        #expect((Int(pending) ?? 0) > 0, "station-1's outbox is empty while the database is down")
        // What the station holds back is said with the failure.
        let away = try await offPool { try a.cli(["status", "--lab"]) }
        #expect(away.status == 75 && away.stderr.contains("this station: \(pending) row(s) not yet sent") && away.stderr.contains("unit number(s) in hand, unreachable since "), "\(away)")
        try await offPool {
            try lab.database.start()
            try lab.waitUntilCaughtUp()
        }

        // Unique unit names across both stations, each from the lab's sequence.
        let units = try await offPool { try lab.database.psql("SELECT station || '|' || unit || '|' || unit_number FROM lab_job ORDER BY station, job") }
            .split(separator: "\n").map { $0.split(separator: "|", omittingEmptySubsequences: false).map(String.init) }
        #expect(units.count == 10, "\(units)")
        #expect(Set(units.map { $0[1] }).count == 10, "unit names taken twice: \(units)")
        for row in units where row.count == 3 { #expect(row[1] == String(format: "unit-%03d", Int(row[2]) ?? -1), "\(row)") }
        #expect(Set(units.map { $0[0] }) == ["station-1", "station-2"])
        // The database's lab_unit agrees: each used number once.
        #expect(try await offPool { try lab.database.psql("SELECT count(*) || '|' || count(DISTINCT number) FROM lab_unit WHERE job IS NOT NULL") } == "10|10")
        // Nothing lost, nothing doubled: the database holds exactly each station's local rows.
        for (i, bench) in lab.benches.enumerated() {
            let station = "station-\(i + 1)"
            let (remote, local, jobs, users, outbox) = try await offPool { () throws -> ([String], [String], String, String, String) in
                let remote = try lab.database.psql("SELECT job || '|' || seq || '|' || state FROM lab_job_event WHERE station = '\(station)' ORDER BY job, seq")
                    .split(separator: "\n").map(String.init)
                return (remote, try Self.localEvents(bench),
                        try lab.database.psql("SELECT count(*) FROM lab_job WHERE station = '\(station)' AND state = 'done'"),
                        try lab.database.psql("SELECT count(*) FROM lab_job_user WHERE station = '\(station)' AND name = 'tech' AND hash LIKE '$6$%'"),
                        try Command.check(["sqlite3", bench.ledgerPath, "SELECT COUNT(*) FROM labOutbox"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines))
            }
            #expect(!local.isEmpty && remote == local, "\(station): database \(remote.count) events, local \(local.count)")
            #expect(jobs == "5")
            #expect(users == "5")
            #expect(outbox == "0")
        }
        // Every row sent again, as after a crash between the database's commit and the
        // outbox's delete: the replay changes nothing (the keys make each row a no-op).
        let (before, after) = try await offPool { () throws -> (String, String) in
            let count = "SELECT (SELECT count(*) FROM lab_job) || '|' || (SELECT count(*) FROM lab_job_event) || '|' || (SELECT count(*) FROM lab_job_user) || '|' || (SELECT count(*) FROM lab_unit WHERE job IS NOT NULL)"
            let before = try lab.database.psql(count)
            try Command.check(["sqlite3", "-cmd", ".timeout 10000", a.ledgerPath, """
                INSERT INTO labOutbox (kind, jobId) SELECT 'job', id FROM job;
                INSERT INTO labOutbox (kind, jobId, eventId) SELECT 'event', jobId, id FROM jobEvent;
                INSERT INTO labOutbox (kind, jobId) SELECT 'users', id FROM job;
                INSERT INTO labOutbox (kind, jobId, unitNumber) SELECT 'unit', jobId, number FROM labUnit WHERE jobId IS NOT NULL;
                """])
            try lab.waitUntilCaughtUp()
            return (before, try lab.database.psql(count))
        }
        #expect(before.hasPrefix("10|") && before.hasSuffix("|10|10"), "\(before)")
        #expect(after == before, "a replay added rows: \(before) → \(after)")
        // The lab's view through either station's daemon.
        let (all, onlyA, table, lines) = try await offPool { () throws -> (CommandOutput, CommandOutput, CommandOutput, CommandOutput) in
            (try b.cli(["jobs", "--lab", "--json", "--limit", "100"]), try b.cli(["jobs", "--lab", "--station", "station-1", "--json"]),
             try b.cli(["status", "--lab"]), try b.cli(["jobs", "--lab"]))
        }
        let jobs = try StationBench.decode([JobRecord].self, all.stdout)
        #expect(jobs.count == 10)
        #expect(Set(jobs.compactMap(\.station)) == ["station-1", "station-2"])
        let mine = try StationBench.decode([JobRecord].self, onlyA.stdout)
        #expect(mine.count == 5 && mine.allSatisfy { $0.station == "station-1" })
        #expect(table.succeeded, "\(table)")
        #expect(table.stdout.contains("station-1") && table.stdout.contains("station-2") && table.stdout.contains("10 unit(s) numbered"), "\(table.stdout)")
        #expect(lines.stdout.hasPrefix("STATION"), "\(lines)")
        _ = (cards, more)
    }

    @Test("a request answered after longer than idle_client_timeout (a lab read behind a lock) gets its answer: a connection is not idle while its request is answered")
    func slowAnswerIsNotIdleness() async throws {
        let (out, took) = try await offPool { () throws -> (CommandOutput, Duration) in
            let database = try PostgresServer()
            defer { database.close() }
            let bench = try StationBench()
            defer { bench.close() }
            let image = try bench.image("small.img", bytes: 1 << 20)
            try """
                [station]
                name = "slow-\(bench.token)"
                allow_loop_devices = true
                ledger = "\(database.url)"
                ledger_password_file = "\(database.passwordFile)"
                ledger_local = "\(bench.ledgerPath)"
                cache_dir = "\(bench.directory)/cache"
                idle_client_timeout = 1

                [profiles.p]
                image = "\(image)"

                [[slots]]
                name = "S1"
                match = "loop:*/provision-card-\(bench.label("S1"))-*"
                profile = "p"

                """.write(toFile: bench.configPath, atomically: true, encoding: .utf8)
            try bench.startDaemon()
            try waitFor("the lab's view", timeout: .seconds(120)) { try bench.cli(["status", "--lab"]).succeeded }
            // Past the daemon's 1 s cache of the lab's view: the next read goes to the database.
            usleep(1_500_000)
            // Another session holds the tables the read needs for 4 s.
            let locked = DispatchSemaphore(value: 0)
            let locker = Thread {
                _ = try? database.psql("BEGIN; LOCK TABLE lab_station, lab_job IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(4); COMMIT")
                locked.signal()
            }
            locker.start()
            try waitFor("the lock", timeout: .seconds(60)) {
                try database.psql("SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = 'lab_job' AND l.mode = 'AccessExclusiveLock' AND l.granted") == "1"
            }
            let asked = ContinuousClock.now
            let out = try bench.cli(["status", "--lab"])
            let took = ContinuousClock.now - asked
            locked.wait()
            return (out, took)
        }
        #expect(out.status == 0, "\(out)")
        // It did wait behind the lock, past the timeout (else this shows nothing).
        #expect(took > .seconds(1), "answered after \(took)")
    }

    @Test("a station that used up its reserved unit numbers while the database is away refuses the next card before writing it, and says why")
    func unitBlockUsedUpWhileAway() async throws {
        let lab = try await offPool { try Lab(stations: 1, unitBlock: 2) }
        defer { lab.close() }
        let bench = lab.benches[0]
        let reserved = try await offPool { () throws -> Int? in
            try lab.startDaemons()
            try lab.waitUntilCaughtUp()
            return try lab.labStatus(bench)?.outbox?.unitsReserved
        }
        #expect(reserved == 2)
        let (status, cards) = try await offPool { () throws -> (StationStatus, [LoopCard]) in
            try lab.database.stop()
            var cards: [LoopCard] = []
            for slot in ["S1", "S2", "S3"] { cards.append(try bench.card(slot: slot, size: 160 << 20)) }
            return (try lab.waitForJobs(bench, slots: ["S1", "S2", "S3"]), cards)
        }
        let jobs = ["S1", "S2", "S3"].compactMap { status.slot($0)?.job }
        #expect(jobs.filter { $0.state == .done }.count == 2)
        let refused = try #require(jobs.first { $0.state == .failed })
        #expect(refused.message?.contains("no lab unit number for this card") == true, "\(refused.message ?? "")")
        #expect(refused.message?.contains("nothing was written") == true)
        // Nothing of the image reached that card: its first MiB is still zeros.
        let card = try #require(cards.first { $0.devicePath == refused.device })
        let head = try await offPool { try Command.check(["bash", "-c", "head -c 1048576 '\(card.devicePath)' | tr -d '\\0' | wc -c"]).stdout }
        #expect(head.trimmingCharacters(in: .whitespacesAndNewlines) == "0")
        let (count, units) = try await offPool { () throws -> (String, String) in
            try lab.database.start()
            try lab.waitUntilCaughtUp()
            return (try lab.database.psql("SELECT count(*) FROM lab_job"),
                    try lab.database.psql("SELECT count(DISTINCT unit) FROM lab_job WHERE unit IS NOT NULL"))
        }
        #expect(count == "3")
        #expect(units == "2")
    }

    @Test("a station whose unit keeps it off IP reaches the database through systemd-socket-proxyd on a Unix socket, as provision-ledger.socket sets it up")
    func reachesTheDatabaseThroughAUnixSocketProxy() async throws {
        let lab = try await offPool { try Lab(stations: 1, unitBlock: 4) }
        defer { lab.close() }
        let bench = lab.benches[0]
        let link = bench.directory + "/ledger-link"
        try FileManager.default.createDirectory(atPath: link, withIntermediateDirectories: true)
        // systemd's own proxy, started the way its socket unit starts it (socket activation).
        let proxy = try ChildProcess(["systemd-socket-activate", "-l", link + "/.s.PGSQL.5432",
                                      "/lib/systemd/systemd-socket-proxyd", "127.0.0.1:\(lab.database.port)"], logPath: bench.directory + "/proxy.log")
        defer { _ = proxy.stop() }
        let (status, row, database, card) = try await offPool { () throws -> (StationStatus, String, String?, LoopCard) in
            _ = try proxy.waitForLine(containing: "Listening on")
            let url = "postgresql://\(lab.database.user)@\(link.replacingOccurrences(of: "/", with: "%2F"))/\(lab.database.database)"
            try lab.writeConfig(bench, name: "proxied", unitBlock: 4, url: url)
            try lab.startDaemons()
            let card = try bench.card(slot: "S1", size: 160 << 20)
            let status = try lab.waitForJobs(bench, slots: ["S1"])
            try lab.waitUntilCaughtUp()
            return (status, try lab.database.psql("SELECT station || ' ' || unit FROM lab_job"), try lab.labStatus(bench)?.database, card)
        }
        #expect(status.slot("S1")?.job?.state == .done, "\(status.slot("S1")?.job?.message ?? "")")
        #expect(row == "proxied unit-001")
        #expect(database?.contains("(Unix socket)") == true, "\(database ?? "no lab status")")
        _ = card
    }

    @Test("the board of a station on a shared ledger shows every station of the lab in Chromium, and says when the lab's view is not current")
    func boardShowsTheLab() async throws {
        if let reason = BrowserSession.unavailable { Issue.record(Comment(rawValue: reason)); return }
        let lab = try await offPool { try Lab() }
        defer { lab.close() }
        let (a, b) = (lab.benches[0], lab.benches[1])
        // Station 2 is still writing (slowly) when the page is looked at.
        let cards = try await offPool { () throws -> [LoopCard] in
            let done = try a.card(slot: "S1", size: 160 << 20)
            let slow = try b.card(slot: "S2", size: 160 << 20)
            try slow.throttle(writeBytesPerSecond: 500_000)
            try lab.startDaemons()
            _ = try lab.waitForJobs(a, slots: ["S1"])
            return [done, slow]
        }
        let board = try await offPool { try BoardUnderTest(bench: a, prefix: try IntegrationTests.BoardBrowserTests.asBoardUser(), name: "lab-board") }
        defer { board.stop() }
        let browser = try await offPool { try BrowserSession(width: 1920, height: 1080, logPath: a.directory + "/chromedriver.log") }
        defer { browser.quit() }
        let stations = """
            return JSON.stringify(Array.from(document.querySelectorAll('#lab .station')).map(s => ({
              name: s.querySelector('.station-name').innerText, figures: s.querySelector('.station-figures').innerText,
              jobs: Array.from(s.querySelectorAll('.job')).map(j => j.innerText) })))
            """
        let (seen, picture) = try await offPool { () throws -> (String, Data) in
            try browser.open(board.url + "/")
            try browser.waitUntil("the lab's two stations, station-2 writing", timeout: .seconds(300), """
                const names = Array.from(document.querySelectorAll('#lab .station .station-name')).map(n => n.innerText);
                const writing = Array.from(document.querySelectorAll('#lab .station[data-station="station-2"] .job')).some(j => j.innerText.toLowerCase().includes('writing'));
                return !document.getElementById('lab').hidden && names.length === 2 && writing
                """)
            let seen = try browser.evaluate(stations) as? String ?? ""
            try FileManager.default.createDirectory(atPath: IntegrationTests.BoardBrowserTests.artifacts, withIntermediateDirectories: true)
            _ = try browser.evaluate("document.getElementById('lab').scrollIntoView(); return true")
            let picture = try browser.screenshot()
            try picture.write(to: URL(fileURLWithPath: IntegrationTests.BoardBrowserTests.artifacts + "/board-lab.png"))
            return (seen, picture)
        }
        let shown = try #require(try JSONSerialization.jsonObject(with: Data(seen.utf8)) as? [[String: Any]])
        #expect(shown.map { $0["name"] as? String } == ["station-1 (this station)", "station-2"], "\(shown)")
        #expect((shown.first?["figures"] as? String)?.contains("1 done, 0 failed today") == true, "\(shown)")
        #expect(picture.count > 10_000)
        // The database goes away: the last view stays, marked as not current.
        let problem = try await offPool { () throws -> String in
            try lab.database.stop()
            try browser.waitUntil("the lab's problem banner", timeout: .seconds(300),
                                  "const p = document.getElementById('lab-problem'); return !p.hidden && p.innerText.includes('not current')")
            return try browser.evaluate("return JSON.stringify([document.getElementById('lab-problem').innerText, document.querySelectorAll('#lab .station').length])") as? String ?? ""
        }
        let banner = try #require(try JSONSerialization.jsonObject(with: Data(problem.utf8)) as? [Any])
        #expect((banner.first as? String)?.contains("unreachable") == true, "\(banner)")
        #expect(banner.last as? Int == 2)
        _ = cards
    }

    @Test("config check names a missing or world-readable password file; the daemon does not start without one")
    func passwordFileProblemsAreClear() async throws {
        let bench = try await offPool { try StationBench() }
        defer { bench.close() }
        let image = try await offPool { try bench.image("i.img", bytes: 1 << 20) }
        let config = """
            [station]
            name = "pw"
            allow_loop_devices = true
            ledger = "postgresql://provision@127.0.0.1:1/lab"
            ledger_password_file = "\(bench.directory)/missing.password"
            ledger_local = "\(bench.ledgerPath)"
            [profiles.p]
            image = "\(image)"
            [[slots]]
            name = "S1"
            match = "loop:*/nothing-*"
            profile = "p"
            """
        try config.write(toFile: bench.configPath, atomically: true, encoding: .utf8)
        let check = try await offPool { try Command.run([DaemonProcess.cliBinary, "config", "check", bench.configPath]) }
        #expect(check.status == 78)
        #expect(check.stderr.contains("ledger_password_file") && check.stderr.contains("missing.password: no such file"), "\(check.stderr)")
        let open = bench.directory + "/open.password"
        try "secret\n".write(toFile: open, atomically: false, encoding: .utf8)
        chmod(open, 0o644)
        try config.replacingOccurrences(of: "missing.password", with: "open.password").write(toFile: bench.configPath, atomically: true, encoding: .utf8)
        let loose = try await offPool { try Command.run([DaemonProcess.cliBinary, "config", "check", bench.configPath]) }
        #expect(loose.status == 78)
        #expect(loose.stderr.contains("can be read by others (mode 644): chmod 600 it"), "\(loose.stderr)")
        chmod(open, 0o600)
        let fine = try await offPool { try Command.run([DaemonProcess.cliBinary, "config", "check", bench.configPath]) }
        #expect(fine.status == 0, "\(fine)")
        #expect(fine.stdout.contains("ledger: shared, postgresql://provision@127.0.0.1:1/lab (password from \(open))"), "\(fine.stdout)")
        #expect(!fine.stdout.contains("secret") && !fine.stderr.contains("secret"))
        chmod(open, 0o644)
        let started = await offPool { () -> String? in
            do { try bench.startDaemon(); return nil } catch { return "\(error)" }
        }
        #expect(started?.contains("chmod 600") == true, "\(started ?? "the daemon started")")
    }
}
