import Dispatch
import Foundation
import ImageHTTP
import Pipeline
@testable import Station
import Logging
@testable import ImageIO
import Testing
import TestSupport

/// A local HTTP(S) server of the tests' own (Python's http.server, `imageserver.py`), which
/// can drop, stall, lie about the length and refuse ranges on request.
final class ImageServer: @unchecked Sendable {
    let process = Process()
    private let stdinPipe = Pipe()
    private let stdoutPipe = Pipe()
    private let output = LineCollector()
    let port: Int
    let scheme: String

    /// The server's stdout, line by line, collected on a thread of its own.
    final class LineCollector: @unchecked Sendable {
        let condition = NSCondition()
        var lines: [String] = []
        var ended = false

        /// Waits (with a deadline) until `value` finds what it looks for in the lines.
        func wait<T>(timeout: Duration, _ value: ([String], Bool) -> T?) throws -> T {
            let deadline = ContinuousClock.now + timeout
            condition.lock()
            defer { condition.unlock() }
            while true {
                if let v = value(lines, ended) { return v }
                guard ContinuousClock.now < deadline else { throw FixtureError("timed out waiting for the image server") }
                _ = condition.wait(until: Date().addingTimeInterval(0.2))
            }
        }
    }

    init(root: String, tls: (cert: String, key: String)? = nil) throws {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("imageserver.py").path
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", script, root] + (tls.map { ["--tls", $0.cert, $0.key] } ?? [])
        process.standardInput = stdinPipe
        process.standardOutput = stdoutPipe
        scheme = tls == nil ? "http" : "https"
        try process.run()
        let handle = stdoutPipe.fileHandleForReading
        let output = output
        Thread {
            var pending = Data()
            while true {
                let data = handle.availableData
                if data.isEmpty { break }
                pending += data
                while let nl = pending.firstIndex(of: 0x0A) {
                    let line = String(decoding: pending[pending.startIndex..<nl], as: UTF8.self)
                    pending = Data(pending[(nl + 1)...])
                    output.condition.withLock { output.lines.append(line); output.condition.broadcast() }
                }
            }
            output.condition.withLock { output.ended = true; output.condition.broadcast() }
        }.start()
        let first = try output.wait(timeout: .seconds(20)) { lines, ended in
            lines.first(where: { $0.hasPrefix("PORT ") }) ?? (ended ? "" : nil)
        }
        guard let port = Int(first.dropFirst(5)) else { throw FixtureError("image server did not start") }
        self.port = port
    }

    func url(_ name: String, _ query: String = "") -> String {
        "\(scheme)://127.0.0.1:\(port)/\(name)\(query.isEmpty ? "" : "?" + query)"
    }

    /// The requests the server has logged: "GET /x.img bytes=100-".
    var requests: [String] { output.condition.withLock { output.lines.filter { $0.hasPrefix("REQ ") }.map { String($0.dropFirst(4)) } } }

    func stop() {
        try? stdinPipe.fileHandleForWriting.close()
        process.waitUntilExit()
    }

    deinit { if process.isRunning { stop() } }
}

/// Runs blocking work (the write engine, which waits for the download) on a thread of its
/// own: the download's task needs Swift's cooperative threads, which a synchronous test would
/// otherwise hold (two cores: two threads).
func onThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        Thread { continuation.resume(with: Result { try body() }) }.start()
    }
}

struct FixtureError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}


@Suite("Images over HTTP", .serialized)
struct HTTPImageTests {
    let scratch: TemporaryDirectory
    let served: String
    let server: ImageServer
    /// 6 MiB of data at 0, 300 KiB and 2 MiB, holes elsewhere; and its .zst and .bmap.
    let image: String

    init() throws {
        scratch = try TemporaryDirectory("provision-http")
        served = scratch.file("www")
        try FileManager.default.createDirectory(atPath: served, withIntermediateDirectories: true)
        image = served + "/disk.img"
        try Command.check(["truncate", "-s", "6M", image])
        let h = FileHandle(forUpdatingAtPath: image)!
        for (offset, seed) in [(UInt64(0), UInt64(1)), (300 << 10, 2), (2 << 20, 3)] {
            try h.seek(toOffset: offset)
            h.write(Data(patternBytes(offset == 2 << 20 ? 3 << 20 : 64 << 10, seed: seed)))
        }
        try h.close()
        try Command.check(["bmaptool", "create", "-o", image + ".bmap", image])
        try Command.check(["zstd", "-q", "-f", image, "-o", image + ".zst"])
        server = try ImageServer(root: served)
    }

    var fastOptions: HTTPOptions {
        var o = HTTPOptions()
        o.readTimeout = .seconds(2)
        o.connectTimeout = .seconds(2)
        return o
    }

    func writeURL(_ url: String, bmap: Bool = false, target name: String = "out.img") throws(ImageIOError) -> (WriteResult, String, HTTPDownload) {
        let (source, download) = try HTTPImage.source(url: url, options: fastOptions)
        var options = WriteOptions()
        if bmap { options.bmap = try Bmap.load(path: image + ".bmap") }
        let path = scratch.file(name)
        let target = try WriteTarget.open(path: path)
        defer { target.close() }
        return (try ImageWriter.write(source: source, to: target, options: options), path, download)
    }

    @Test("raw and zstd images stream byte-exact, with and without a bmap", arguments: ["disk.img", "disk.img.zst"])
    func streamsByteExact(name: String) async throws {
        for bmap in [false, true] {
            let (result, path, _) = try await onThread { try self.writeURL(self.server.url(name), bmap: bmap, target: "out-\(bmap).img") }
            #expect(result.verified)
            #expect(try Command.run(["cmp", image, path]).succeeded, "\(name) bmap=\(bmap)")
        }
        // Streamed: one full GET each, no temporary copy. (On a loaded machine the tests'
        // short read timeout may make a download resume: those GETs ask for a byte range.)
        #expect(server.requests.filter { $0.hasPrefix("GET /\(name) ") && !$0.contains("bytes=") }.count == 2, "\(server.requests)")
    }

    @Test("a dropped connection is resumed with a range request, and the card is byte-exact")
    func resumesAfterDrop() async throws {
        let (result, path, download) = try await onThread { try self.writeURL(self.server.url("disk.img.zst", "drop=100000")) }
        #expect(result.verified)
        #expect(download.resumptions == 1)
        #expect(try Command.run(["cmp", image, path]).succeeded)
        // Resumed from what had arrived (at most the 100000 bytes sent: an abrupt close can
        // lose some in flight), not from the start.
        let resumedAt = server.requests.compactMap { r -> Int? in
            guard r.hasPrefix("GET /disk.img.zst bytes="), r.hasSuffix("-") else { return nil }
            return Int(r.dropFirst("GET /disk.img.zst bytes=".count).dropLast())
        }
        #expect(resumedAt.count == 1 && resumedAt[0] > 0 && resumedAt[0] <= 100000, "\(server.requests)")
    }

    @Test("a stalled connection is resumed after the read timeout")
    func resumesAfterStall() async throws {
        let (result, path, download) = try await onThread { try self.writeURL(self.server.url("disk.img", "stall=1500000")) }
        #expect(result.verified)
        #expect(download.resumptions == 1)
        #expect(try Command.run(["cmp", image, path]).succeeded)
    }

    @Test("a drop from a server without ranges fails the write with a clear error, never 'done'")
    func dropWithoutRangesFails() async throws {
        let target = scratch.file("dropped.img")
        let e = await #expect(throws: ImageIOError.self) {
            _ = try await onThread { try self.writeURL(self.server.url("disk.img", "drop=2500000&ranges=0"), target: "dropped.img") }
        }
        #expect(e?.code == .imageUnreadable && e!.message.contains("2500000") && e!.message.contains("does not allow resuming"), "\(String(describing: e))")
        // The first MiB was held back: the file does not look like the image.
        #expect(!(try Command.run(["cmp", "-n", "4096", image, target]).succeeded))
    }

    @Test("a server that announces more bytes than it sends fails the write")
    func wrongContentLength() async throws {
        let e = await #expect(throws: ImageIOError.self) {
            _ = try await onThread { try self.writeURL(self.server.url("disk.img", "extra=4096&ranges=0"), target: "short.img") }
        }
        // The bytes received before it broke off depend on the read timeout under load; the
        // announced length and that it broke off do not.
        #expect(e?.code == .imageUnreadable && e!.message.contains("broke off after") && e!.message.contains("of \((6 << 20) + 4096) bytes"), "\(String(describing: e))")
    }

    @Test("404 is 'image not found', naming the URL")
    func notFound() async throws {
        let e = await #expect(throws: ImageIOError.self) {
            _ = try await onThread { try HTTPImage.source(url: self.server.url("missing.img"), options: self.fastOptions).source }
        }
        #expect(e?.code == .imageMissing && e!.message.contains("404") && e!.message.contains("missing.img"), "\(String(describing: e))")
    }

    @Test("a server whose certificate is not trusted is a TLS failure, before anything is written")
    func tlsFailure() async throws {
        let cert = scratch.file("cert.pem"), key = scratch.file("key.pem")
        try Command.check(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                           "-days", "1", "-subj", "/CN=127.0.0.1"])
        let tls = try ImageServer(root: served, tls: (cert, key))
        defer { tls.stop() }
        let e = await #expect(throws: ImageIOError.self) {
            _ = try await onThread { try HTTPImage.source(url: tls.url("disk.img"), options: self.fastOptions).source }
        }
        #expect(e?.code == .imageUnreadable && e!.message.contains("TLS failure"), "\(String(describing: e))")
    }

    @Test("a format provision does not write is refused from the first bytes of the download")
    func refusesOtherFormatOverHTTP() async throws {
        try Command.check(["qemu-img", "convert", "-O", "qcow2", image, served + "/disk.qcow2"])
        let e = await #expect(throws: ImageIOError.self) {
            _ = try await onThread { try HTTPImage.source(url: self.server.url("disk.qcow2"), options: self.fastOptions).source }
        }
        #expect(e?.code == .unsupportedFormat, "\(String(describing: e))")
    }
}

/// `provision write URL FILE` end to end, through the real CLI binary.
@Suite("provision write with a URL", .serialized)
struct WriteCommandURLTests {
    let scratch: TemporaryDirectory
    let served: String
    let server: ImageServer
    let image: String

    init() throws {
        scratch = try TemporaryDirectory("provision-http-cli")
        served = scratch.file("www")
        try FileManager.default.createDirectory(atPath: served, withIntermediateDirectories: true)
        image = served + "/disk.img"
        try Command.check(["truncate", "-s", "6M", image])
        let h = FileHandle(forUpdatingAtPath: image)!
        try h.seek(toOffset: 1 << 20)
        h.write(Data(patternBytes(2 << 20, seed: 7)))
        try h.close()
        try Command.check(["bmaptool", "create", "-o", image + ".bmap", image])
        try Command.check(["zstd", "-q", "-f", image, "-o", image + ".zst"])
        server = try ImageServer(root: served)
    }

    @Test("a .zst URL is written and verified, with the bmap found next to it on the server")
    func writesURL() throws {
        let out = scratch.file("cli-out.img")
        let r = try Command.run([DaemonProcess.cliBinary, "write", "--json", server.url("disk.img.zst"), out, "--yes"], timeout: .seconds(120))
        #expect(r.status == 0, "\(r)")
        // The bmap was found on the server, next to the image (its name with .zst stripped).
        let result = try #require(r.stdout.split(separator: "\n").last(where: { $0.contains("\"result\"") }))
        #expect(result.contains("disk.img.bmap"), "\(result)")
        #expect(server.requests.contains("GET /disk.img.bmap -"), "\(server.requests)")
        #expect(try Command.run(["cmp", image, out]).succeeded)
    }

    @Test("a server that refuses the guessed bmap names (403, as object stores do) gets the whole image written and verified; a bmap named outright and refused is an error")
    func refusedBmapGuess() throws {
        let out = scratch.file("cli-denied.img")
        let r = try Command.run([DaemonProcess.cliBinary, "write", "--json", server.url("disk.img.zst", "deny=.bmap"), out, "--yes"], timeout: .seconds(120))
        #expect(r.status == 0, "\(r)")
        // Every name bmaptool would try was asked for and refused; no bmap was used.
        #expect(server.requests.contains("GET /disk.img.zst.bmap -") && server.requests.contains("GET /disk.img.bmap -") && server.requests.contains("GET /disk.bmap -"),
                "\(server.requests)")
        let result = try #require(r.stdout.split(separator: "\n").last(where: { $0.contains("\"result\"") }))
        #expect(!result.contains(".bmap"), "\(result)")
        #expect(try Command.run(["cmp", image, out]).succeeded)

        let named = try Command.run([DaemonProcess.cliBinary, "write", "--bmap", server.url("disk.img.bmap", "deny=.bmap"), server.url("disk.img.zst"),
                                     scratch.file("cli-denied2.img"), "--yes"], timeout: .seconds(120))
        #expect(named.status != 0, "\(named)")
        #expect(named.stderr.contains("403"), "\(named.stderr)")
    }

    @Test("the download's progress is shown with the write's: bytes received of the announced length")
    func showsDownloadProgress() throws {
        let out = scratch.file("cli-progress.img")
        // stderr is no terminal here: the progress comes as lines.
        let r = try Command.run([DaemonProcess.cliBinary, "write", "--nobmap", server.url("disk.img"), out, "--yes"], timeout: .seconds(300))
        #expect(r.status == 0, "\(r)")
        #expect(r.stderr.contains(" · downloaded 6 MiB of 6 MiB (100%)"), "\(r.stderr)")
        // JSON readers get the same numbers in each progress object.
        let j = try Command.run([DaemonProcess.cliBinary, "write", "--json", "--nobmap", server.url("disk.img"), out, "--yes"], timeout: .seconds(300))
        #expect(j.stdout.contains("\"bytesDownloaded\":\(6 << 20)") && j.stdout.contains("\"downloadTotal\":\(6 << 20)"), "\(j.stdout)")
    }

    @Test("a URL that is not there exits 66 and says 404")
    func missingURL() throws {
        let r = try Command.run([DaemonProcess.cliBinary, "write", server.url("nothing.img.xz"), scratch.file("x.img"), "--yes"], timeout: .seconds(60))
        #expect(r.status == 66, "\(r)")
        #expect(r.stderr.contains("404"), "\(r.stderr)")
    }
}

/// The station's download cache: a batch downloads once; a rebuilt image is noticed at the
/// next card.
@Suite("Station downloads", .serialized)
struct StationDownloadTests {
    @Test("cards of a batch share one download; a changed image is downloaded again for the next card")
    func downloadsOncePerVersion() async throws {
        let scratch = try TemporaryDirectory("provision-http-cache")
        let served = scratch.file("www")
        try FileManager.default.createDirectory(atPath: served, withIntermediateDirectories: true)
        let image = served + "/board.img.xz"
        try Data(patternBytes(1 << 20, seed: 1)).write(to: URL(fileURLWithPath: served + "/board.img"))
        try Command.check(["xz", "-0", "-k", "-f", served + "/board.img"])
        let server = try ImageServer(root: served)
        defer { server.stop() }
        let cache = try ImageCacheStore(directory: scratch.file("cache"), limit: 1 << 30)
        let url = server.url("board.img.xz")

        let first = try await onThread { try cache.localImage(url: url, findBmap: true) }
        let second = try await onThread { try cache.localImage(url: url, findBmap: true) }
        #expect(first.path == second.path)
        #expect(cache.downloadsCompleted == 1)
        // Full GETs only: a download resumed under load (a read past its timeout on a busy
        // machine) asks for a range of the same file, and is still one download.
        #expect(server.requests.filter { $0 == "GET /board.img.xz -" }.count == 1, "\(server.requests)")
        #expect(try Command.run(["cmp", image, first.path]).succeeded)
        cache.releaseDownload(first.key)
        cache.releaseDownload(second.key)

        // The build server rebuilds the image: the next card gets the new one.
        try Data(patternBytes(1 << 20, seed: 2)).write(to: URL(fileURLWithPath: served + "/board.img"))
        try Command.check(["xz", "-0", "-k", "-f", served + "/board.img"])
        let third = try await onThread { try cache.localImage(url: url, findBmap: true) }
        defer { cache.releaseDownload(third.key) }
        #expect(third.path != first.path)
        #expect(cache.downloadsCompleted == 2)
        #expect(try Command.run(["cmp", image, third.path]).succeeded)
        // The old version is gone from the station's disk once no card reads it.
        #expect(!FileManager.default.fileExists(atPath: first.path))
    }

    @Test("a profile's image URL stays a URL (not a path under the profile's directory)")
    func profileKeepsURL() throws {
        let profile = try Profile.parse(toml: "name = \"net\"\nimage = \"https://build.example/pi.img.xz\"\nbmap = \"https://build.example/pi.img.bmap\"\n",
                                        source: "/etc/provision/net.toml", baseDirectory: "/etc/provision")
        #expect(profile.image?.file == "https://build.example/pi.img.xz")
        #expect(profile.image?.bmap == .file("https://build.example/pi.img.bmap"))
    }
}

/// The station's side of a server that fails mid-download (issue 17): cards written from a
/// URL through the real card pipeline and the station's download cache, onto loop cards.
@Suite("Station downloads that fail", .serialized)
struct StationDownloadFailureTests {
    final class Reports: CardReportSink, @unchecked Sendable {
        let lock = NSLock()
        var all: [CardReport] = []
        func receive(_ report: CardReport) { lock.withLock { all.append(report) } }
        var stages: [CardStage] {
            lock.withLock { all.compactMap { if case .stage(let s, _, _, _) = $0 { s } else { nil } } }
        }
        var downloadProgress: [WriteProgress] {
            lock.withLock {
                all.compactMap { r -> WriteProgress? in
                    switch r {
                    case .stage(.downloading, _, _, let p): p
                    case .progress(let p) where p.phase == .preparing: p
                    default: nil
                    }
                }
            }
        }
    }

    /// The station's way with a URL: through the download cache, every progress report.
    static func job(_ url: String, cache: ImageCacheStore, device: String) -> CardJob {
        var job = CardJob(image: url, target: device, policy: nil)
        job.bmap = .none
        job.supplier = cache
        job.probeCapacity = false
        job.progressInterval = .zero
        return job
    }

    func card(_ url: String, cache: ImageCacheStore, device: String) -> (CardOutcome, Reports) {
        let reports = Reports()
        return (CardPipeline(job: Self.job(url, cache: cache, device: device), sink: reports).run(), reports)
    }

    /// A card job run on a thread of its own from the moment it is made, with its own cancel.
    final class RunningCard: @unchecked Sendable {
        let reports = Reports()
        let cancellation = CancellationFlag()
        private let finished = DispatchSemaphore(value: 0)
        private var outcome: CardOutcome = .cancelled("never ran")

        init(_ url: String, cache: ImageCacheStore, device: String) {
            let job = StationDownloadFailureTests.job(url, cache: cache, device: device)
            let thread = Thread { [self] in
                outcome = CardPipeline(job: job, cancellation: cancellation, sink: reports).run()
                finished.signal()
            }
            thread.start()
        }

        /// Blocks: call it off the pool.
        func wait() -> CardOutcome {
            finished.wait()
            return outcome
        }

        /// Blocks until the card reported download progress (it is downloading, or waiting
        /// for another card's download of the same image). Off the pool.
        func waitUntilDownloading() throws {
            let deadline = ContinuousClock.now + .seconds(120)
            while (reports.downloadProgress.last?.bytesDone ?? 0) == 0 {
                guard ContinuousClock.now < deadline else { throw FixtureError("no download progress: \(reports.all)") }
                usleep(20_000)
            }
        }
    }

    @Test("a card cancelled while its image downloads ends then, writing nothing; the download no other card waits for is stopped, not resumed, and its file deleted")
    func cancelledWhileDownloading() async throws {
        let scratch = try TemporaryDirectory("provision-http-cancel")
        defer { scratch.remove() }
        let served = scratch.file("www")
        try FileManager.default.createDirectory(atPath: served, withIntermediateDirectories: true)
        try Data(patternBytes(4 << 20, seed: 11)).write(to: URL(fileURLWithPath: served + "/slow.img"))
        let server = try ImageServer(root: served)
        defer { server.stop() }
        let cache = try ImageCacheStore(directory: scratch.file("cache"), limit: 1 << 30)
        // 1 MB, then nothing for 30 s: past the read timeout, the download would be resumed.
        let url = server.url("slow.img", "stall=1000000")
        let never = scratch.file("never-opened.img")

        let outcome = try await offPool { () throws -> CardOutcome in
            let card = RunningCard(url, cache: cache, device: never)
            try card.waitUntilDownloading()
            card.cancellation.cancel()
            return card.wait()
        }
        guard case .cancelled(let message) = outcome else {
            Issue.record("a card cancelled mid-download ended \(outcome)")
            return
        }
        #expect(message.contains("while the image was downloaded from \(url)"), "\(message)")
        #expect(!FileManager.default.fileExists(atPath: never), "the card was opened")
        // Nobody waits for the download any more: it stops, and its file goes.
        let leftovers = try await offPool { () throws -> [String] in
            let deadline = ContinuousClock.now + .seconds(120)
            while true {
                let files = try FileManager.default.contentsOfDirectory(atPath: scratch.file("cache"))
                if files.isEmpty && cache.downloadEntryCount == 0 || ContinuousClock.now > deadline { return files }
                usleep(20_000)
            }
        }
        #expect(leftovers.isEmpty && cache.downloadEntryCount == 0, "\(leftovers)")
        #expect(!server.requests.contains { $0.hasPrefix("GET /slow.img bytes=") }, "the stopped download was resumed: \(server.requests)")
        #expect(cache.downloadsCompleted == 0)
    }

    @Test("a download other cards wait for goes on when the card that started it is cancelled; they are written from it, downloaded once")
    func cancellingTheFirstCardKeepsTheSharedDownload() async throws {
        let scratch = try TemporaryDirectory("provision-http-share")
        defer { scratch.remove() }
        let served = scratch.file("www")
        try FileManager.default.createDirectory(atPath: served, withIntermediateDirectories: true)
        let image = served + "/shared.img"
        try Data(patternBytes(6 << 20, seed: 12)).write(to: URL(fileURLWithPath: image))
        let server = try ImageServer(root: served)
        defer { server.stop() }
        let cache = try ImageCacheStore(directory: scratch.file("cache"), limit: 1 << 30)
        // 6 MiB at 2 MB/s: both cards are in the download for seconds.
        let url = server.url("shared.img", "rate=2000000")
        let first = try await offPool { try LoopCard(label: "dl-first", size: 8 << 20) }
        defer { first.close() }
        let second = try await offPool { try LoopCard(label: "dl-second", size: 8 << 20) }
        defer { second.close() }
        let blank = try await offPool { try first.sha256() }

        let (cancelled, written, secondReports) = try await offPool { () throws -> (CardOutcome, CardOutcome, Reports) in
            let starter = RunningCard(url, cache: cache, device: first.devicePath)
            try starter.waitUntilDownloading()
            let joiner = RunningCard(url, cache: cache, device: second.devicePath)
            try joiner.waitUntilDownloading()
            starter.cancellation.cancel()
            return (starter.wait(), joiner.wait(), joiner.reports)
        }
        guard case .cancelled(let message) = cancelled else {
            Issue.record("the cancelled card ended \(cancelled)")
            return
        }
        #expect(message.contains("while the image was downloaded"), "\(message)")
        guard case .done(let result) = written else {
            Issue.record("the card waiting for the same download ended \(written)")
            return
        }
        #expect(result.write.verified)
        #expect(secondReports.downloadProgress.last?.bytesDone == 6 << 20, "\(secondReports.downloadProgress.last.map { "\($0)" } ?? "none")")
        let expected = try await offPool { String(try Command.check(["sha256sum", image]).stdout.prefix(64)) }
        #expect(try await offPool { try second.sha256(bytes: 6 << 20) } == expected)
        #expect(try await offPool { try first.sha256() } == blank, "the cancelled card was written")
        #expect(server.requests.filter { $0.hasPrefix("GET /shared.img ") }.count == 1, "\(server.requests)")
        #expect(cache.downloadsCompleted == 1)
    }

    @Test("a server failing mid-download fails that card (downloading, nothing written, never done); the next card downloads again and is done")
    func failedDownloadFailsTheCardAndTheNextRetries() async throws {
        let scratch = try TemporaryDirectory("provision-http-fail")
        defer { scratch.remove() }
        let served = scratch.file("www")
        try FileManager.default.createDirectory(atPath: served, withIntermediateDirectories: true)
        let image = served + "/unit.img"
        try Data(patternBytes(4 << 20, seed: 9)).write(to: URL(fileURLWithPath: image))
        let server = try ImageServer(root: served)
        defer { server.stop() }
        let cache = try ImageCacheStore(directory: scratch.file("cache"), limit: 1 << 30)
        // Breaks off after 1.5 MB on the first GET, and cannot be resumed (no ranges).
        let url = server.url("unit.img", "dropfirst=1500000&ranges=0")
        // Loop devices made, and hashed, off the concurrency pool (blocking work).
        let first = try await TestSupport.offPool { try LoopCard(label: "dl-fail", size: 8 << 20) }
        defer { first.close() }
        let second = try await TestSupport.offPool { try LoopCard(label: "dl-retry", size: 8 << 20) }
        defer { second.close() }
        let blank = try await TestSupport.offPool { try first.sha256() }

        let (failed, failedReports) = await TestSupport.offPool { self.card(url, cache: cache, device: first.devicePath) }
        guard case .failed(let failure) = failed else {
            Issue.record("a card whose download broke off ended \(failed)")
            return
        }
        #expect(failure.message.contains(url) && failure.message.contains("does not allow resuming"), "\(failure.message)")
        #expect(failedReports.stages == [.downloading], "it was downloading, and never began writing: \(failedReports.stages)")
        #expect(try await TestSupport.offPool { try first.sha256() } == blank, "nothing of the half download reached the card")
        #expect(cache.knownImageSize(url: url) == nil)

        let (done, doneReports) = await TestSupport.offPool { self.card(url, cache: cache, device: second.devicePath) }
        guard case .done(let result) = done else {
            Issue.record("the next card did not retry the download: \(done)")
            return
        }
        #expect(result.write.verified)
        #expect(doneReports.stages.first == .downloading && doneReports.stages.contains(.writing))
        // Its progress went up to the whole announced length.
        #expect(doneReports.downloadProgress.last?.bytesDone == 4 << 20 && doneReports.downloadProgress.last?.bytesTotal == 4 << 20,
                "\(doneReports.downloadProgress.last.map { "\($0)" } ?? "no progress")")
        let expected = try await TestSupport.offPool { String(try Command.check(["sha256sum", image]).stdout.prefix(64)) }
        #expect(try await TestSupport.offPool { try second.sha256(bytes: 4 << 20) } == expected)
        #expect(server.requests.filter { $0.hasPrefix("GET /unit.img ") }.count == 2, "\(server.requests)")
        // From now on the station knows what the image needs on a card, before any download:
        // its too-small check (the safety policy's minimum size) uses it.
        #expect(cache.knownImageSize(url: url) == 4 << 20)
        let config = try StationConfig.parse(text: """
            [station]
            name = "downloads"
            ledger = "\(scratch.file("ledger.sqlite"))"
            [profiles.net]
            image = "\(url)"
            [[slots]]
            name = "S1"
            match = "platform-none"
            profile = "net"
            """, file: scratch.file("station.toml"))
        let station = Station(config: config, ledger: try Ledger(path: config.ledgerPath), logger: Logger(label: "test"), cache: cache)
        let profile = try #require(config.profiles["net"])
        #expect(await station.minimumSize(of: profile) == 4 << 20)
    }
}
