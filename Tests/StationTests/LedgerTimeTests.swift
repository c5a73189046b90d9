// The ledger writes its times itself (issue 18: ICU's date formatting was most of a state
// change's cost at 32 cards); they must be exactly what GRDB writes for a `Date`, which is
// what the ledger wrote before and what GRDB reads back.

import Foundation
import GRDB
@testable import Station
import Testing

@Suite("ledger: stored times")
struct LedgerTimeTests {
    @Test("a stored time is GRDB's text for the same Date, to the millisecond, and reads back as it")
    func storedTimesAreGRDBs() throws {
        var generator = SystemRandomNumberGenerator()
        var dates: [Date] = [Date(), Date(timeIntervalSince1970: 0), Date(timeIntervalSince1970: -0.0005),
                             Date(timeIntervalSince1970: 951_782_400.999_9),  // 2000-02-29, a hair before the next second
                             Date(timeIntervalSince1970: 4_102_444_799.999), Date(timeIntervalSince1970: -62_135_596_800),  // year 1: Julian, GRDB's
                             Date(timeIntervalSince1970: -11_676_096_000), Date(timeIntervalSince1970: -11_676_096_000.0004),  // 1600, 1599
                             Date(timeIntervalSince1970: 253_402_300_799.9996), Date(timeIntervalSince1970: 0.0015), Date(timeIntervalSince1970: 1.0005)]
        for _ in 0..<20_000 {
            // Whole milliseconds (where float rounding decides a digit), fractions, and any time.
            let seconds = Double(Int64.random(in: -2_208_988_800...4_102_444_800, using: &generator))
            switch Int.random(in: 0..<3, using: &generator) {
            case 0: dates.append(Date(timeIntervalSince1970: seconds + Double(Int.random(in: 0..<1000, using: &generator)) / 1000))
            case 1: dates.append(Date(timeIntervalSinceReferenceDate: (seconds - 978_307_200) + Double.random(in: 0..<1, using: &generator)))
            default: dates.append(Date(timeIntervalSince1970: seconds + Double(Int.random(in: 0..<1_000_000, using: &generator)) / 1_000_000))
            }
        }
        // Half a millisecond past whole ones, and the doubles either side: where rounding decides.
        for i in 0..<5_000 {
            let half = Double(Int64.random(in: 0...4_102_444_800, using: &generator)) + Double(i % 1000) / 1000 + 0.0005
            dates += [half, half.nextUp, half.nextDown].map { Date(timeIntervalSince1970: $0) }
            let reference = Double(Int64.random(in: -978_307_200...3_124_137_600, using: &generator)) + Double(i % 1000) / 1000 + 0.0005
            dates += [reference, reference.nextUp, reference.nextDown].map { Date(timeIntervalSinceReferenceDate: $0) }
        }
        var differing: [String] = []
        for date in dates {
            let grdb = try #require(String.fromDatabaseValue(date.databaseValue))
            let ours = Ledger.stored(date)
            if ours != grdb { differing.append("\(date.timeIntervalSinceReferenceDate): \(ours) ≠ GRDB \(grdb)") }
            #expect(Date.fromDatabaseValue(ours.databaseValue) == Date.fromDatabaseValue(grdb.databaseValue))
        }
        #expect(differing.isEmpty, "\(differing.count) of \(dates.count) differ, e.g. \(differing.prefix(5))")
    }
}
