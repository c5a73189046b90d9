import ControlProtocol
import Foundation
@testable import Station
import Testing

/// The watch fan-out (issue 13, point 3): every state change in order, progress coalesced,
/// and a subscriber that falls too far behind ended with a flag, never fed a hole.
@Suite("event hub")
struct EventHubTests {
    /// When the job was made: a job's creation time never changes, unlike `updated`.
    static let created = Date(timeIntervalSince1970: 1_800_000_000)

    func job(_ id: Int64, _ state: JobState, done bytes: UInt64 = 0) -> Event {
        let now = Date()
        return Event(kind: .job, job: JobRecord(id: id, kind: "sd", slot: "A1", device: "/dev/loop9", serial: nil, unit: nil, profile: nil, image: nil,
                                                state: state, progress: JobProgress(bytesDone: bytes, bytesTotal: 100, bytesPerSecond: 1, secondsRemaining: nil),
                                                created: Self.created, updated: now))
    }

    @Test("a subscriber that has not read gets every state change in order, with only the newest progress of each state")
    func progressIsCoalescedStatesAreNot() async {
        let hub = EventHub(backlogLimit: 16)
        let events = hub.subscribe()
        hub.publish(job(1, .queued))
        for b in 1...50 { hub.publish(job(1, .writing, done: UInt64(b))) }
        hub.publish(job(2, .writing, done: 7))
        for b in 51...99 { hub.publish(job(1, .writing, done: UInt64(b))) }
        hub.publish(job(1, .verifying))
        hub.publish(Event(kind: .reload, message: "r"))
        hub.publish(job(1, .done))
        var seen: [String] = []
        var iterator = events.makeAsyncIterator()
        for _ in 0..<5 {
            guard let e = await iterator.next() else { break }
            seen.append(e.job.map { "\($0.id) \($0.state.rawValue) \($0.progress?.bytesDone ?? 0)" } ?? e.kind.rawValue)
        }
        // Job 1's pending progress is replaced where it stands (only its newest counts),
        // job 2's event and every state change stay, in order.
        #expect(seen == ["1 queued 0", "1 writing 99", "2 writing 7", "1 verifying 0", "reload"])
        #expect(await iterator.next()?.job?.state == .done)
        #expect(!events.overflowed)
    }

    @Test("a subscriber too far behind is ended and flagged; the others go on")
    func overflowEndsTheSubscriber() async {
        let hub = EventHub(backlogLimit: 8)
        let slow = hub.subscribe()
        let fast = hub.subscribe()
        var fastIterator = fast.makeAsyncIterator()
        for i in 0..<9 {
            hub.publish(job(Int64(i), .queued))
            #expect(await fastIterator.next()?.job?.id == Int64(i))
        }
        #expect(hub.subscriberCount == 1, "the overflowed subscriber is dropped")
        var slowIterator = slow.makeAsyncIterator()
        #expect(await slowIterator.next() == nil, "its pending events were released: nothing is delivered after a hole")
        #expect(slow.overflowed)
        hub.publish(job(99, .queued))
        #expect(await fastIterator.next()?.job?.id == 99)
        #expect(!fast.overflowed)
    }

    @Test("a cancelled watcher's iteration ends and it leaves the hub")
    func cancellationEnds() async {
        let hub = EventHub()
        let task = Task {
            let events = hub.subscribe()
            for await _ in events {}
            return events.overflowed
        }
        while hub.subscriberCount == 0 { await Task.yield() }
        task.cancel()
        #expect(await task.value == false)
        #expect(hub.subscriberCount == 0)
    }
}
