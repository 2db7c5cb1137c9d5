//! The `eventqueue` command.

fn main() {
    println!("eventqueue");
}
