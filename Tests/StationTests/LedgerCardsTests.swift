// The card table over a long run (issue 18, "a month unattended"): every written card's
// slow-card note asks for the 20 cards seen last; the ledger answers from an index, not by
// sorting every card the station ever wrote.

import Foundation
import GRDB
@testable import Station
import Testing
import TestSupport

@Suite("ledger: remembered cards at scale")
struct LedgerCardsTests {
    @Test("the peers of a card are the 20 seen last, read through the lastSeen index without sorting the table")
    func peersComeFromTheIndex() async throws {
        let dir = try TemporaryDirectory("provision-ledger-cards")
        let ledger = try Ledger(path: dir.file("ledger.sqlite"))
        let start = Date(timeIntervalSince1970: 1_800_000_000)
        // Seen in an order that is not the insertion order: the answer must follow lastSeen.
        let order = (0..<300).map { ($0 * 7919) % 300 }
        for i in order {
            try await ledger.rememberCard(id: "card-\(i)", strength: "reader", detail: "d", verdict: "good", reason: nil, job: Int64(i),
                                          writeBytesPerSecond: Double(i + 1), at: start.addingTimeInterval(Double(i)))
        }
        let peers = try await ledger.peerWriteSpeeds(excluding: "card-299")
        #expect(peers == (279...298).reversed().map { Double($0) + 1 })

        let plan = try await ledger.db.read { db in
            try Row.fetchAll(db, sql: "EXPLAIN QUERY PLAN " + Ledger.peerSpeedsSQL, arguments: ["card-299", 20]).map { $0["detail"] as String }
        }
        #expect(plan.contains { $0.contains("card_lastSeen") }, "\(plan)")
        #expect(!plan.contains { $0.contains("TEMP B-TREE") }, "\(plan)")
    }
}
