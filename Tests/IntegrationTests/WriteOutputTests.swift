import Foundation
import Testing
import TestSupport

/// `provision write` off a terminal (a log, a CI job): phases in the order they happen, and
/// only rates and times that were measured (issue 15, point 6).
@Suite("provision write output off a terminal")
struct WriteOutputTests {
    @Test("phases come in order, with no 0.0 MB/s and no 0.0 s")
    func phasesInOrderWithHonestNumbers() throws {
        let dir = try TemporaryDirectory()
        defer { dir.remove() }
        let image = dir.file("image.raw")
        try Command.check(["bash", "-c", "head -c \(24 << 20) /dev/urandom > \(image)"])
        let output = try Command.run([DaemonProcess.cliBinary, "write", "--yes", image, dir.file("card.img")], timeout: .seconds(120))
        #expect(output.succeeded, "\(output)")
        let lines = output.stderr.split(separator: "\n").map(String.init)
        // Phases as they first appear: each once, in the pipeline's order.
        var phases: [String] = []
        for line in lines {
            guard let word = line.split(separator: " ").first.map(String.init),
                  ["writing", "syncing", "verifying"].contains(word), phases.last != word else { continue }
            phases.append(word)
        }
        #expect(phases == ["writing", "syncing", "verifying"], "\(output.stderr)")
        let writingDone = try #require(lines.firstIndex { $0.hasPrefix("writing 100% 24 MiB of 24 MiB ") }, "\(output.stderr)")
        let syncing = try #require(lines.firstIndex { $0.hasPrefix("syncing") }, "\(output.stderr)")
        #expect(writingDone < syncing, "\(output.stderr)")
        #expect(lines[writingDone].hasSuffix(" MB/s"), "the write's rate is measured: \(lines[writingDone])")
        #expect(!output.stderr.contains("0.0 MB/s"), "\(output.stderr)")
        #expect(!output.stderr.contains(" 0.0 s"), "\(output.stderr)")
        let done = try #require(lines.last)
        #expect(done.hasPrefix("done: wrote 24 MiB to \(dir.file("card.img")) in ") && done.contains("verified"), "\(done)")
        #expect(try Command.run(["cmp", image, dir.file("card.img")]).succeeded)
    }
}
