#if canImport(Glibc)
import Glibc
#endif
import ControlProtocol
import Foundation
import Testing
import TestSupport

/// A station runs for weeks between restarts: after every job, on every ending (done,
/// cancelled, card pulled, failed), the daemon's descriptors, threads and memory must come
/// back to where they were. Fifty cards here; `benchmarks/soak.sh` runs the same with 500
/// (PROVISION_ENDURANCE_CARDS) and prints the table.
@Suite("Endurance", .serialized, .ownThread)
struct EnduranceTests {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    struct Sample: CustomStringConvertible {
        var cards: Int
        var fds: Int
        var threads: Int
        var rssKiB: Int
        var description: String { "\(cards) cards: \(fds) fds, \(threads) threads, RSS \(rssKiB) KiB" }
    }

    /// What each open descriptor of `pid` points at (for a failure message).
    static func descriptors(_ pid: pid_t) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []
        return names.compactMap { try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\($0)") }.sorted()
    }

    /// `a` less `b`, counting repeats ("anon_inode:[eventfd]" three times, say).
    static func difference(_ a: [String], _ b: [String]) -> [String] {
        var left = b
        return a.filter { item in
            guard let i = left.firstIndex(of: item) else { return true }
            left.remove(at: i)
            return false
        }
    }

    static func sample(_ pid: pid_t, cards: Int) throws -> Sample {
        let fds = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count
        let threads = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task").count
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        let rss = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") }
            .flatMap { Int($0.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") } ?? -1
        return Sample(cards: cards, fds: fds, threads: threads, rssKiB: rss)
    }

    enum Ending: CaseIterable { case done, cancelled, pulled, failed }

    /// Nine cards in ten end done; the tenth, third and sixth end otherwise.
    static func ending(_ i: Int) -> Ending {
        switch i % 10 {
        case 3: .cancelled
        case 6: .pulled
        case 9: .failed
        default: .done
        }
    }

    @Test("50 cards through one daemon — done, cancelled, pulled, failed — leave its descriptors, threads and memory where they were")
    func cardsInARowLeaveNothingBehind() throws {
        let environment = ProcessInfo.processInfo.environment
        let count = environment["PROVISION_ENDURANCE_CARDS"].flatMap(Int.init) ?? 50
        let every = environment["PROVISION_ENDURANCE_EVERY"].flatMap(Int.init) ?? 10
        let bench = try StationBench()
        defer { bench.close() }
        // The test image, compressed (read through the station's cache) with its bmap.
        try Command.check([Self.repository + "/images/build-test-image", "--out", bench.directory, "--size", "128MiB", "--compress", "zst", "--quiet"],
                          timeout: .seconds(180))
        let image = bench.directory + "/rpi-test.img.zst"
        // A damaged copy for the failing cards: the stream ends half-way.
        let broken = bench.directory + "/broken.img.zst"
        let size = try #require((try FileManager.default.attributesOfItem(atPath: image))[.size] as? Int)
        try Command.check(["sh", "-c", "head -c \(size / 2) '\(image)' > '\(broken)'"])
        let hash = try Command.check(["mkpasswd", "--method=SHA-512", "endurance"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        try """
            [station]
            name = "endurance-\(bench.token)"
            allow_loop_devices = true
            ledger = "\(bench.ledgerPath)"
            cache_dir = "\(bench.directory)/cache"
            admin_group = "provision-admin"

            [profiles.good]
            image = "\(image)"
            [profiles.good.root]
            partition = 2
            [[profiles.good.users]]
            name = "tech"
            groups = ["users"]
            hash = "\(hash)"

            [profiles.broken]
            image = "\(broken)"

            [[slots]]
            name = "E1"
            match = "loop:*/provision-card-\(bench.label("E1"))-*"
            profile = "good"

            [[slots]]
            name = "EF"
            match = "loop:*/provision-card-\(bench.label("EF"))-*"
            profile = "broken"
            """.write(toFile: bench.configPath, atomically: true, encoding: .utf8)
        let daemon = try bench.startDaemon()
        let pid = try #require(daemon.pid)
        // Settled like every later sample: a daemon just started may be judging another test's
        // loop device that udev announced meanwhile, a sysfs file open for that moment.
        let start = try waitForSettled(pid, cards: 0)
        let startDescriptors = Self.descriptors(pid)
        var samples: [Sample] = []
        var afterFirst: Sample?
        var endings: [Ending: Int] = [:]

        for i in 0..<count {
            let ending = Self.ending(i)
            let job: JobRecord
            switch ending {
            case .done:
                let card = try bench.card(slot: "E1", size: 160 << 20)
                job = try finished(bench, slot: "E1")
                #expect(job.state == .done, "card \(i): \(job.message ?? "")")
                card.close()
            case .failed:
                let card = try bench.card(slot: "EF", size: 160 << 20)
                job = try finished(bench, slot: "EF")
                #expect(job.state == .failed && job.message?.contains("truncated") == true, "card \(i): \(job.state) \(job.message ?? "")")
                card.close()
            case .cancelled, .pulled:
                // A card in no slot, slowed down, then flashed by hand: so that it is surely
                // still writing when it is cancelled or pulled.
                let card = try bench.card(slot: "MANUAL", size: 160 << 20)
                try card.throttle(writeBytesPerSecond: 1_000_000)
                try bench.waitForStatus("\(card.devicePath) to be seen") { $0.refused.contains { $0.device == card.devicePath } }
                let flash = try bench.cli(["flash", card.devicePath, "--profile", "good", "--json"])
                #expect(flash.succeeded, "\(flash)")
                let running = try bench.waitForStatus("the manual job to write 1 MiB") { s in
                    s.otherJobs.contains { $0.device == card.devicePath && $0.state == .writing && ($0.progress?.bytesDone ?? 0) >= 1 << 20 }
                }
                let id = try #require(running.otherJobs.first { $0.device == card.devicePath }?.id)
                if ending == .cancelled {
                    let cancel = try bench.cli(["cancel", "\(id)"])
                    #expect(cancel.succeeded, "\(cancel)")
                } else {
                    try card.pull()
                }
                job = try waitForJob(bench, id: id)
                if ending == .cancelled {
                    #expect(job.state == .cancelled, "card \(i): \(job.state) \(job.message ?? "")")
                } else {
                    #expect(job.state == .failed && job.message?.contains("card removed") == true, "card \(i): \(job.state) \(job.message ?? "")")
                }
                card.close()
            }
            endings[ending, default: 0] += 1
            // Idle again: no card, no job running.
            try bench.waitForStatus("the station to be idle after card \(i)") { s in
                // (Loop devices of other tests running meanwhile show as refused too.)
                s.slots.allSatisfy { $0.device == nil } && s.otherJobs.allSatisfy { $0.state.isFinal }
                    && !s.refused.contains { $0.slotPath?.contains(bench.token) == true }
            }
            let now = try waitForSettled(pid, cards: i + 1)
            if i == 0 { afterFirst = now }
            if (i + 1) % every == 0 || i + 1 == count { samples.append(now) }
        }

        let first = try #require(afterFirst)
        let end = try #require(samples.last)
        print("endurance: start \(start)")
        print("endurance: after the first card \(first)")
        for s in samples { print("endurance: \(s)") }
        if samples.count >= 2 {
            let span = Double(samples.last!.cards - samples.first!.cards)
            print(String(format: "endurance: slope per 100 cards: %+.2f fds, %+.2f threads, %+.0f KiB RSS",
                         Double(samples.last!.fds - samples.first!.fds) / span * 100,
                         Double(samples.last!.threads - samples.first!.threads) / span * 100,
                         Double(samples.last!.rssKiB - samples.first!.rssKiB) / span * 100))
        }
        #expect(endings.count == Ending.allCases.count || count < 10, "every kind of ending must have happened: \(endings)")
        let endDescriptors = Self.descriptors(pid)
        #expect(end.fds == start.fds, """
            descriptors: \(start.fds) at start, \(end.fds) after \(count) cards; \
            new: \(Self.difference(endDescriptors, startDescriptors)), gone: \(Self.difference(startDescriptors, endDescriptors))
            """)
        #expect(end.rssKiB - first.rssKiB <= 8 << 10, "RSS grew from \(first.rssKiB) KiB after the first card to \(end.rssKiB) KiB after \(count)")
        #expect(end.threads <= first.threads, "threads: \(first.threads) after the first card, \(end.threads) after \(count)")
    }

    /// The finished job of `slot`'s card.
    func finished(_ bench: StationBench, slot: String) throws -> JobRecord {
        let status = try bench.waitForStatus("\(slot)'s job to end", timeout: .seconds(180)) { $0.slot(slot)?.job?.state.isFinal == true }
        return try #require(status.slot(slot)?.job)
    }

    func waitForJob(_ bench: StationBench, id: Int64) throws -> JobRecord {
        var found: JobRecord?
        try bench.waitForStatus("job \(id) to end", timeout: .seconds(120)) { _ in
            found = (try? bench.jobs())?.first { $0.id == id && $0.state.isFinal }
            return found != nil
        }
        return try #require(found)
    }

    /// A job's thread ends just after its last report: the sample is taken once the
    /// daemon's thread count has stopped changing (two equal readings in a row) and no sysfs
    /// file is open (the daemon reads those while it judges a device, other tests' loop
    /// devices included; one it kept open would stay, and fail the comparison).
    func waitForSettled(_ pid: pid_t, cards: Int) throws -> Sample {
        var last = try Self.sample(pid, cards: cards)
        let deadline = ContinuousClock.now + .seconds(10)
        while ContinuousClock.now < deadline {
            usleep(50_000)
            let now = try Self.sample(pid, cards: cards)
            if now.threads == last.threads && now.fds == last.fds && !Self.descriptors(pid).contains(where: { $0.hasPrefix("/sys/") }) {
                return now
            }
            last = now
        }
        return last
    }
}
