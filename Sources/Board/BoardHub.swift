import Foundation

/// Owns the board's state and hands each open page the newest snapshot. A page that reads
/// slowly (a phone on bad Wi-Fi) gets the latest picture when it is ready, never a backlog:
/// each subscription buffers one snapshot only.
actor BoardHub {
    private var state = BoardState()
    private var subscribers: [Int: AsyncStream<BoardSnapshot>.Continuation] = [:]
    private var nextSubscriber = 0
    private var closed = false

    /// Snapshots sent to pages (a test checks that an unchanged lab sends none).
    private(set) var broadcasts = 0

    func apply(_ message: StationFeed.Message) {
        switch message {
        case .connected(let hello): state.connected(station: hello.station)
        case .status(let status): state.apply(status)
        case .finished(let jobs): state.apply(finishedJobs: jobs)
        case .event(let event): state.apply(event)
        case .disconnected(let reason): state.disconnected(reason)
        // The lab is read every 2 s and mostly unchanged: the page rebuilds its whole lab
        // section for each snapshot, so an unchanged one is not sent.
        case .lab(let lab): guard state.apply(lab: lab) else { return }
        case .labUnavailable(let reason): guard state.labUnavailable(reason) else { return }
        }
        broadcast()
    }

    /// Sends the snapshot again (time-dependent parts may have changed).
    func touch() { broadcast() }

    var snapshot: BoardSnapshot { state.snapshot() }

    /// A stream that starts with the current snapshot and ends when the board stops.
    func subscribe() -> (id: Int, snapshots: AsyncStream<BoardSnapshot>) {
        let (stream, continuation) = AsyncStream.makeStream(of: BoardSnapshot.self, bufferingPolicy: .bufferingNewest(1))
        if closed {
            continuation.finish()
            return (-1, stream)
        }
        let id = nextSubscriber
        nextSubscriber += 1
        subscribers[id] = continuation
        continuation.yield(state.snapshot())
        return (id, stream)
    }

    func unsubscribe(_ id: Int) {
        subscribers.removeValue(forKey: id)?.finish()
    }

    func close() {
        closed = true
        for continuation in subscribers.values { continuation.finish() }
        subscribers.removeAll()
    }

    private func broadcast() {
        guard !subscribers.isEmpty else { return }
        let snapshot = state.snapshot()
        broadcasts += 1
        for continuation in subscribers.values { continuation.yield(snapshot) }
    }
}
