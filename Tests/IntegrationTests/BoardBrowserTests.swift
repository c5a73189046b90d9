#if canImport(Glibc)
import Glibc
#endif
import ControlProtocol
import Foundation
import Testing
import TestSupport

extension IntegrationTests {
    /// The bench's screen in a real browser (issue 19): provisiond with loop cards, the
    /// board as an unprivileged process, and Debian's headless Chromium through chromedriver.
    @Suite("board in Chromium")
    struct BoardBrowserTests {
        static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        /// Where the screenshots go (kept after the run; `docs/board.png` is one of them).
        static let artifacts = repository + "/.build/artifacts"

        /// nobody:nogroup with only the `provision` group: what the systemd unit gives the board.
        static func asBoardUser() throws -> [String] {
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--groups=\(try getGID("provision"))"]
        }

        /// The tiles as the page shows them (text as rendered, upper-casing aside).
        static let readTiles = """
            return Array.from(document.querySelectorAll('.tile')).map(t => ({
              section: t.parentElement.id, name: t.querySelector('.name').textContent,
              word: t.querySelector('.word').textContent, tone: t.dataset.tone,
              shownWord: t.querySelector('.word').innerText.toLowerCase(),
              percent: t.querySelector('.percent').innerText, rate: t.querySelector('.rate').innerText,
              eta: t.querySelector('.eta').innerText, detail: t.querySelector('.detail').innerText,
              unit: t.querySelector('.unit').innerText }))
            """

        static func tile(_ name: String) -> String {
            "Array.from(document.querySelectorAll('#slots .tile')).find(t => t.querySelector('.name').textContent === '\(name)')"
        }

        static func word(_ name: String, is word: String) -> String {
            "const t = \(tile(name)); return !!t && t.querySelector('.word').textContent === '\(word)' && t.querySelector('.word').offsetParent !== null"
        }

        static func percent(_ name: String) -> String {
            "const t = \(tile(name)); return t ? parseFloat(t.querySelector('.percent').innerText) || 0 : 0"
        }

        @Test("tiles in config order, live progress, done, a pulled card's failure, refusal, recovery after a daemon restart, and a phone")
        func boardFollowsABatch() throws {
            if let reason = BrowserSession.unavailable { Issue.record(Comment(rawValue: reason)); return }
            let bench = try StationBench()
            defer { bench.close() }
            let image = try bench.image("raspios-lab.img", bytes: 48 << 20)
            // The config's order is the tower's order, top to bottom; not alphabetical.
            let slots = ["top", "middle", "bottom", "side", "spare"]
            try bench.writeConfig(slots.map { .init(name: $0, image: image) })
            // Throttled before the daemon sees them, so the batch is still running when the
            // page is looked at: top 6 MB/s (done in ~8 s), middle 2 MB/s (pulled), bottom
            // 1.5 MB/s (still writing when top is done).
            let top = try bench.card(slot: "top", size: 64 << 20)
            try top.throttle(writeBytesPerSecond: 6_000_000)
            let middle = try bench.card(slot: "middle", size: 64 << 20)
            try middle.throttle(writeBytesPerSecond: 2_000_000)
            let bottom = try bench.card(slot: "bottom", size: 64 << 20)
            try bottom.throttle(writeBytesPerSecond: 1_500_000)
            try bench.card(slot: "side", size: 64 << 20, options: .init(readOnly: true))

            let board = try BoardUnderTest(bench: bench, prefix: try Self.asBoardUser())
            defer { board.stop() }
            let browser = try BrowserSession(width: 1920, height: 1080, logPath: bench.directory + "/chromedriver.log")
            defer { browser.quit() }
            try browser.open(board.url + "/")
            try browser.setViewport(width: 1920, height: 1080)

            // 1. One tile per slot, in the config's order, before any daemon exists: the
            //    banner says it is unreachable.
            try browser.waitUntil("the unreachable banner", timeout: .seconds(20),
                                  "const b = document.getElementById('banner'); return !b.hidden && b.innerText.includes('provisiond unreachable')")
            let firstDaemon = try bench.startDaemon()
            try browser.waitUntil("five tiles in config order",
                                  "return Array.from(document.querySelectorAll('#slots .tile .name')).map(n => n.textContent).join(',') === '\(slots.joined(separator: ","))'")
            try browser.waitUntil("the banner to go", "return document.getElementById('banner').hidden")
            #expect(try browser.evaluate("return document.getElementById('station').textContent") as? String == "integration-\(bench.token)")

            // 2. Progress advances, with MB/s and time left on the tile.
            try browser.waitUntil("middle to be writing", Self.word("middle", is: "writing") + " && parseFloat(t.querySelector('.percent').innerText) > 0")
            let first = try #require(browser.evaluate(Self.percent("middle")) as? Double)
            try browser.waitUntil("middle's percentage to grow past \(first + 5)", "return (() => { \(Self.percent("middle")) })() > \(first + 5)")
            let writing = try #require(browser.evaluate("const t = \(Self.tile("middle")); return [t.querySelector('.rate').innerText, t.querySelector('.eta').innerText, t.dataset.tone]") as? [String])
            #expect(writing[0].hasSuffix(" MB/s"), "rate: \(writing)")
            #expect(writing[1].hasSuffix(" left"), "eta: \(writing)")
            #expect(writing[2] == "busy")

            // 3. Several cards writing, one refused, one slot empty.
            let writingAll = ["top", "middle", "bottom"]
                .map { "(() => { \(Self.word($0, is: "writing")) && parseFloat(t.querySelector('.percent').innerText) >= 8 })()" }
                .joined(separator: " && ")
            try browser.waitUntil("top, middle and bottom writing and side refused",
                                  "return \(writingAll) && (() => { \(Self.word("side", is: "refused")) })()")
            try FileManager.default.createDirectory(atPath: Self.artifacts, withIntermediateDirectories: true)
            let picture = try browser.screenshot()
            try picture.write(to: URL(fileURLWithPath: Self.artifacts + "/board-writing.png"))
            #expect(picture.starts(with: [0x89, 0x50, 0x4E, 0x47]), "a PNG")
            let side = try #require(browser.evaluate("return \(Self.tile("side")).querySelector('.detail').innerText") as? String)
            #expect(side.contains("write-protected"), "side: \(side)")
            #expect(try browser.evaluate("return \(Self.tile("spare")).querySelector('.word').textContent") as? String == "idle")

            // 4. A card pulled mid-write shows its failure, in full, and keeps showing it
            //    after the daemon has forgotten the empty slot.
            try middle.pull()
            try browser.waitUntil("middle to fail with 'card removed'",
                                  Self.word("middle", is: "failed") + " && t.querySelector('.detail').innerText.includes('card removed')")
            try bench.waitForStatus("middle's slot to be empty") { $0.slot("middle")?.device == nil && $0.slot("middle")?.job == nil }
            try browser.waitUntil("middle to still show its failure", Self.word("middle", is: "failed"))

            // 5. A finished card turns to "done — remove card"; the header counts it.
            try browser.waitUntil("top to be done", timeout: .seconds(90), Self.word("top", is: "done — remove card"))
            #expect(try browser.evaluate("return \(Self.tile("top")).querySelector('.word').innerText") as? String == "DONE — REMOVE CARD")
            try browser.waitUntil("the header to count 1 done and 1 failed",
                                  "return document.getElementById('done-today').textContent === '1' && document.getElementById('failed-today').textContent === '1'")
            // Mid-batch, every colour at once: done, failed, writing, refused, idle. The
            // picture in the README (docs/board.png).
            if try browser.evaluate("return (() => { \(Self.word("bottom", is: "writing")) })()") as? Bool == true {
                try browser.screenshot().write(to: URL(fileURLWithPath: Self.artifacts + "/board-mid-batch.png"))
            } else {
                Issue.record("bottom finished before top: no mid-batch picture (the throttles did not hold)")
            }
            try browser.waitUntil("bottom to be done", timeout: .seconds(90), Self.word("bottom", is: "done — remove card"))
            try browser.waitUntil("the header to count 2 done",
                                  "return document.getElementById('done-today').textContent === '2'")

            // 6. The daemon goes away: a banner, the tiles kept but marked stale. It comes
            //    back: the page recovers by itself and is live again (a new card is followed).
            #expect(firstDaemon.stop() == 0, "provisiond exits 0 on SIGTERM; log:\n\(bench.log)")
            try browser.waitUntil("the unreachable banner after the daemon stopped",
                                  "const b = document.getElementById('banner'); return !b.hidden && b.innerText.includes('provisiond unreachable') && document.body.classList.contains('stale')")
            #expect(try browser.evaluate("return document.querySelectorAll('#slots .tile').length") as? Int == slots.count)
            try bench.startDaemon()
            try browser.waitUntil("the banner to go after the restart",
                                  "return document.getElementById('banner').hidden && !document.body.classList.contains('stale')")
            try browser.waitUntil("top still done after the restart", Self.word("top", is: "done — remove card"))
            let spare = try bench.card(slot: "spare", size: 64 << 20)
            try spare.throttle(writeBytesPerSecond: 8_000_000)
            try browser.waitUntil("the new card in spare to be followed", timeout: .seconds(90),
                                  "const t = \(Self.tile("spare")); return !!t && ['writing', 'verifying', 'done — remove card'].includes(t.querySelector('.word').textContent)")
            print("board tiles at the end: \(try browser.evaluate(Self.readTiles) ?? "none")")

            // 7. On a phone: one column, nothing wider than the screen, every tile readable.
            try browser.resize(width: 390, height: 844)
            try browser.waitUntil("a phone-sized viewport", timeout: .seconds(10), "return window.innerWidth <= 400")
            let layout = try #require(browser.evaluate("""
                const tiles = Array.from(document.querySelectorAll('.tile'));
                return { overflow: document.documentElement.scrollWidth - window.innerWidth,
                         lefts: [...new Set(tiles.map(t => Math.round(t.getBoundingClientRect().left)))].length,
                         nameSize: parseFloat(getComputedStyle(tiles[0].querySelector('.name')).fontSize) }
                """) as? [String: Any])
            #expect(layout["overflow"] as? Int == 0, "\(layout)")
            #expect(layout["lefts"] as? Int == 1, "one column: \(layout)")
            #expect((layout["nameSize"] as? Double ?? 0) >= 28, "\(layout)")
            try browser.screenshot().write(to: URL(fileURLWithPath: Self.artifacts + "/board-phone.png"))
            #expect(board.process.isRunning, "board log:\n\(board.log)")
        }
    }
}
