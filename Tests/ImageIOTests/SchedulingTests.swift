import Foundation
@testable import ImageIO
import Testing

/// A station's card threads ask the scheduler for short slices (issue 18), so that a card whose
/// I/O completes runs before a decoder's slice ends. Checked in the kernel's own account of the
/// thread: `/proc/thread-self/sched` and its nice value.
@Suite("card thread scheduling")
struct SchedulingTests {
    /// Runs `body` on a thread of its own and returns what it returned.
    func onThread<T: Sendable>(_ body: @escaping @Sendable () -> T) -> T {
        let done = DispatchSemaphore(value: 0)
        nonisolated(unsafe) var result: T?
        let thread = Thread {
            result = body()
            done.signal()
        }
        thread.start()
        done.wait()
        return result!
    }

    static func slice() -> UInt64? {
        guard let text = try? String(contentsOfFile: "/proc/thread-self/sched", encoding: .utf8) else { return nil }
        let line = text.split(separator: "\n").first { $0.hasPrefix("se.slice") }
        return line.flatMap { $0.split(separator: ":").last.flatMap { UInt64($0.trimmingCharacters(in: .whitespaces)) } }
    }

    @Test("a card thread's slice is the card slice, its nice value is kept, and other threads keep theirs")
    func cardThreadGetsTheShortSlice() throws {
        let (before, after, niceBefore, niceAfter, accepted) = onThread { () -> (UInt64?, UInt64?, Int32, Int32, Bool) in
            // A nice value of its own first: asking for a slice must not reset it to 0.
            _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0, 3)
            let before = Self.slice()
            let niceBefore = getpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0)
            let accepted = ImageWriter.shortenSlice()
            return (before, Self.slice(), niceBefore, getpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0), accepted)
        }
        try #require(before != nil, "this kernel shows no se.slice (EEVDF, Linux 6.6 and later)")
        #expect(accepted)
        #expect(before != ImageWriter.cardSlice, "the default slice was already the card slice: the test would prove nothing")
        #expect(after == ImageWriter.cardSlice)
        #expect(niceBefore == 3 && niceAfter == 3)
        #expect(Self.slice() == before, "the calling thread's own slice did not change")
    }
}
