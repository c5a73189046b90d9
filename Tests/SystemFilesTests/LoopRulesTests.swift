// The real systemd-udevd with the project's rules and the test-only loop rule, on real
// loop devices.

import Foundation
import Testing
import TestSupport

@Suite("udev rules under a running systemd-udevd (loop cards)")
struct LoopRulesTests {
    let udevd: Udevd
    let gid: String
    let ruleFiles = Udevd.projectRuleFiles()

    init() throws {
        gid = try provisionGroupID()
        udevd = try Udevd.ensureRunning()
    }

    @Test func tagsAnAttachedLoopCardWithItsSlotAndGroup() throws {
        try udevd.withRules(ruleFiles) {
            let card = try LoopCard(label: "A1", size: 16 << 20)
            defer { card.close() }
            let properties = try udevd.waitForProperties(of: card.devicePath) {
                $0["CURRENT_TAGS"]?.contains(":provision:") == true
            }
            let tags = Udevd.tags(from: properties["CURRENT_TAGS"])
            #expect(tags.isSuperset(of: ["provision", "provision-loop"]))
            #expect(properties["PROVISION_SLOT_PATH"] == card.slotPath)
            #expect(properties["PROVISION_SLOT_PATH"]?.hasPrefix("loop:/") == true)
            #expect(properties["DEVTYPE"] == "disk")
            // The node itself: udevd applied GROUP and MODE.
            var info = stat()
            #expect(stat(card.devicePath, &info) == 0)
            #expect(String(info.st_gid) == gid)
            #expect(info.st_mode & 0o777 == 0o660)
        }
    }

    @Test func leavesALoopDeviceWithAnotherBackingFileAlone() throws {
        try udevd.withRules(ruleFiles) {
            let directory = try TemporaryDirectory("provision-not-a-card")
            defer { directory.remove() }
            let file = directory.path + "/disk-image.img"
            try Command.check(["truncate", "--size=16M", file])
            let device = try Command.check(["losetup", "--find", "--show", file]).stdout
                .trimmingCharacters(in: .whitespacesAndNewlines)
            defer { _ = try? Command.run(["losetup", "--detach", device]) }
            // Wait for the event of this attach, not an older entry of a reused loopN.
            let name = URL(fileURLWithPath: device).lastPathComponent
            let sequence = try String(contentsOfFile: "/sys/block/\(name)/diskseq", encoding: .utf8)
                .trimmingCharacters(in: .whitespacesAndNewlines)
            let properties = try udevd.waitForProperties(of: device) {
                $0["DISKSEQ"] == sequence && $0["CURRENT_TAGS"] != nil
            }
            #expect(properties["DISKSEQ"] == sequence)
            #expect(!Udevd.tags(from: properties["CURRENT_TAGS"]).contains("provision"))
            #expect(properties["PROVISION_SLOT_PATH"] == nil)
            // The rule hands a reused loop device back to root:disk, whatever it was before.
            var info = stat()
            #expect(stat(device, &info) == 0)
            #expect(String(info.st_gid) != gid, "udev properties: \(properties)")
        }
    }

    @Test func leavesThePartitionsOfATaggedCardAlone() throws {
        try udevd.withRules(ruleFiles) {
            let directory = try TemporaryDirectory("provision-partitioned")
            defer { directory.remove() }
            let image = directory.path + "/image.img"
            try Command.check(["truncate", "--size=32M", image])
            try Command.check(["sfdisk", "--quiet", image], input: "label: dos\n,8M,c\n,,83\n")
            let card = try LoopCard(label: "parts", size: 32 << 20, image: image,
                                    options: .init(partitionScan: true))
            defer { card.close() }
            let partition = card.devicePath + "p2"
            let disk = try udevd.waitForProperties(of: card.devicePath) {
                $0["CURRENT_TAGS"]?.contains(":provision:") == true
            }
            #expect(Udevd.tags(from: disk["CURRENT_TAGS"]).contains("provision"))
            let properties = try udevd.waitForProperties(of: partition) { $0["DEVTYPE"] == "partition" }
            #expect(properties["DEVTYPE"] == "partition")
            #expect(!Udevd.tags(from: properties["CURRENT_TAGS"]).contains("provision"))
            #expect(properties["PROVISION_SLOT_PATH"] == nil)
            var info = stat()
            #expect(stat(partition, &info) == 0)
            #expect(String(info.st_gid) != gid)
        }
    }

    @Test func aDetachedCardLosesItsCurrentTagButNotItsStickyTag() throws {
        // The daemon must read CURRENT_TAGS: TAGS still says `provision` after the card left.
        try udevd.withRules(ruleFiles) {
            let card = try LoopCard(label: "gone", size: 8 << 20)
            defer { card.close() }
            _ = try udevd.waitForProperties(of: card.devicePath) {
                $0["CURRENT_TAGS"]?.contains(":provision:") == true
            }
            try card.detach()
            #expect(!card.isAttached)
            let properties = try udevd.waitForProperties(of: card.devicePath) {
                $0["CURRENT_TAGS"]?.contains(":provision:") == false
            }
            #expect(!Udevd.tags(from: properties["CURRENT_TAGS"]).contains("provision"))
            #expect(properties["PROVISION_SLOT_PATH"] == nil)
            #expect(try udevd.stickyTags(of: card.devicePath).contains("provision"))
            #expect(try !udevd.currentTags(of: card.devicePath).contains("provision"))
        }
    }

    @Test func installedRulesAreRemovedAgain() throws {
        let rules = try udevd.installRules(ruleFiles)
        #expect(rules.paths.count == 2)
        #expect(rules.paths.allSatisfy { FileManager.default.fileExists(atPath: $0) })
        #expect(rules.paths[0].hasPrefix("/run/udev/rules.d/70-provision-test-"))
        try rules.remove()
        #expect(rules.paths.allSatisfy { !FileManager.default.fileExists(atPath: $0) })
        try rules.remove()  // idempotent
    }

    @Test func refusesToInstallARuleFileThatDoesNotExist() throws {
        #expect(throws: (any Error).self) {
            _ = try udevd.installRules(["/nonexistent/70-provision.rules"])
        }
    }
}
