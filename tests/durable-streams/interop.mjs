// Interop: the npm client (@durable-streams/client, pinned in package-lock.json) writes and
// reads a JSON stream on a real eventqueue server. Run in two phases around a restart:
//   node interop.mjs write  <base-url> <state-file>   create, append (plain and idempotent
//                                                     producer), read back; save the offset
//   node interop.mjs resume <base-url> <state-file>   after the restart: nothing new at the
//                                                     saved offset, append more, read from it
// Exits non-zero on any mismatch.
import { readFileSync, writeFileSync } from "node:fs"
import { DurableStream, IdempotentProducer, stream } from "@durable-streams/client"

const [phase, base, stateFile] = process.argv.slice(2)
const url = `${base}/v1/stream/interop-npm`

function check(cond, what) {
  if (!cond) {
    console.error(`npm interop FAILED: ${what}`)
    process.exit(1)
  }
}

async function readAll(offset) {
  const res = await stream({ url, offset, live: false })
  const items = await res.json()
  return { items, offset: res.offset }
}

if (phase === "write") {
  const s = await DurableStream.create({ url, contentType: "application/json" })
  for (let i = 0; i < 3; i++) await s.append(JSON.stringify({ n: i }))
  const producer = new IdempotentProducer(s, "interop-producer")
  for (let i = 3; i < 6; i++) producer.append(JSON.stringify({ n: i }))
  await producer.flush()
  const { items, offset } = await readAll("-1")
  check(JSON.stringify(items.map((m) => m.n)) === "[0,1,2,3,4,5]", `read back ${JSON.stringify(items)}`)
  writeFileSync(stateFile, JSON.stringify({ offset }))
  console.log(`npm interop: wrote and read 6 messages, next offset ${offset}`)
} else if (phase === "resume") {
  const { offset } = JSON.parse(readFileSync(stateFile, "utf8"))
  const s = await DurableStream.connect({ url })
  const before = await readAll(offset)
  check(before.items.length === 0, `messages after the saved offset before any append: ${JSON.stringify(before.items)}`)
  await s.append(JSON.stringify({ n: 6 }))
  await s.append(JSON.stringify({ n: 7 }))
  await s.append(JSON.stringify({ n: 8 }))
  const after = await readAll(offset)
  check(JSON.stringify(after.items.map((m) => m.n)) === "[6,7,8]", `resumed read ${JSON.stringify(after.items)}`)
  const all = await readAll("-1")
  check(
    JSON.stringify(all.items.map((m) => m.n)) === "[0,1,2,3,4,5,6,7,8]",
    `whole stream after restart ${JSON.stringify(all.items)}`
  )
  console.log("npm interop: resumed after the restart, nothing lost or repeated")
} else {
  console.error("usage: node interop.mjs write|resume <base-url> <state-file>")
  process.exit(2)
}
