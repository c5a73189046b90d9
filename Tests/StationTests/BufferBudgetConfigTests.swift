// The station's buffer budget (issue 18): `buffer_budget` in [station], and the chunk size a
// card gets from it.

import Foundation
import Testing
@testable import Station

struct BufferBudgetConfigTests {
    /// The one slot every station config needs (the same as the document checks use).
    static let slot = StationDocumentCheckTests.slot

    @Test func defaultIs48MiBAndTheKeySetsIt() throws {
        let plain = try StationConfig.parse(text: "[station]\nname = \"b\"\n" + Self.slot, file: "station.toml")
        #expect(plain.bufferBudget == 48 << 20)
        let set = try StationConfig.parse(text: "[station]\nbuffer_budget = \"96MiB\"\n" + Self.slot, file: "station.toml")
        #expect(set.bufferBudget == 96 << 20)
    }

    @Test(arguments: ["\"512KiB\"", "\"17GiB\"", "\"lots\"", "-1"])
    func outOfRangeOrMalformedIsAnErrorNamingTheKey(value: String) throws {
        do {
            _ = try StationConfig.parse(text: "[station]\nname = \"b\"\nbuffer_budget = \(value)\n" + Self.slot, file: "station.toml")
            Issue.record("buffer_budget = \(value) was accepted")
        } catch let error as ConfigError {
            #expect(error.keyPath == "station.buffer_budget" && error.line == 3, "\(error)")
        }
    }

    @Test func outOfRangeSaysTheRange() throws {
        #expect(throws: ConfigError.self) {
            _ = try StationConfig.parse(text: "[station]\nbuffer_budget = \"512KiB\"\n" + Self.slot, file: "station.toml")
        }
        do {
            _ = try StationConfig.parse(text: "[station]\nbuffer_budget = \"512KiB\"\n" + Self.slot, file: "station.toml")
        } catch let error as ConfigError {
            #expect(error.message.contains("1MiB to 16GiB"), "\(error)")
        }
    }

    @Test("chunks stay 4 MiB while the budget holds one and a read-back piece per card, and shrink to 1 MiB for 32 cards on 48 MiB")
    func chunkSizeFollowsTheBudget() {
        let mib = 1 << 20
        #expect(Station.chunkSize(budget: 48 * mib, cards: 1) == 4 * mib)
        #expect(Station.chunkSize(budget: 48 * mib, cards: 11) == 4 * mib, "11 × 4.25 MiB = 46.75 MiB")
        #expect(Station.chunkSize(budget: 48 * mib, cards: 12) == 2 * mib)
        #expect(Station.chunkSize(budget: 48 * mib, cards: 21) == 2 * mib, "21 × 2.25 MiB = 47.25 MiB")
        #expect(Station.chunkSize(budget: 48 * mib, cards: 22) == mib)
        #expect(Station.chunkSize(budget: 48 * mib, cards: 32) == mib, "32 × 1.25 MiB = 40 MiB")
        #expect(Station.chunkSize(budget: 48 * mib, cards: 200) == mib, "never below 1 MiB: more cards wait their turn instead")
        #expect(Station.chunkSize(budget: 256 * mib, cards: 32) == 4 * mib)
        #expect(Station.chunkSize(budget: mib, cards: 4) == mib)
    }
}
