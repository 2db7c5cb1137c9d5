mod helpers;
mod http;
mod library;
mod migrate;
mod nodes;
mod redis;
mod reliability;
